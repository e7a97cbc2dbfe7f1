"""An example project for celery-batched: a sentence-embedding service batched by the worker.

``celery -A example_project worker -Q gpu`` runs the tasks; ``uvicorn example_project.web:api``
serves them over HTTP; ``python -m example_project.demo`` shows both batched tasks end to end
without any server.
"""

from .celery_app import QUEUE, app, config_from_env
from . import tasks  # noqa: E402,F401  (registers the tasks on the app)

__all__ = ["app", "config_from_env", "QUEUE", "tasks"]
