# The example project's image: the library, the MiniLM example, the FastAPI app and Flower.
FROM python:3.11-slim
WORKDIR /app
ENV PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# CPU build of torch from its own index (a plain `torch` from PyPI is a multi-GB CUDA build);
# for a GPU image, change the index URL to the CUDA one you need.
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY celery_batched ./celery_batched
RUN pip install --no-cache-dir ".[example]"
COPY example_project ./example_project
RUN useradd --create-home app
USER app
CMD ["celery", "-A", "example_project", "worker", "-Q", "gpu", "-c", "1", "--loglevel=INFO"]
