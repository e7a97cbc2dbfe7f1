"""The example project's Celery app, configured from the environment.

``CELERY_BROKER_URL`` and ``CELERY_RESULT_BACKEND`` (default: the local Redis, db 0) pick the
broker and the result backend; ``CELERY_BROKER_TRANSPORT_OPTIONS`` (a JSON object) is passed to
the transport -- the demo uses it for ``filesystem-atomic://``, kombu's filesystem transport with
atomic writes (see ``fs_transport``). ``EXAMPLE_RESULT_SERIALIZER`` (read at import) is the
results' format: ``json`` (the default) or ``msgpack`` (smaller and faster to encode for vectors);
set the same value for the workers and their clients, since a client decodes results with its own
setting. Celery itself also reads the
two URL variables whenever it opens a connection, so the environment always wins over
``app.conf``. :func:`config_from_env` can be applied again after changing the environment, as
long as the app hasn't connected yet (the demo does this).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from celery import Celery

from . import fs_transport  # noqa: F401  (registers the filesystem-atomic:// transport)

DEFAULT_URL = "redis://127.0.0.1:6379/0"
#: Every example task (batched or not) goes to this queue: the workers that own the model.
QUEUE = "gpu"


def config_from_env(environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """The settings that come from the environment."""
    raw_options = environ.get("CELERY_BROKER_TRANSPORT_OPTIONS") or "{}"
    try:
        options = json.loads(raw_options)
    except ValueError as exc:
        raise ValueError(f"CELERY_BROKER_TRANSPORT_OPTIONS must be a JSON object, got {raw_options!r}") from exc
    if not isinstance(options, dict):
        raise ValueError(f"CELERY_BROKER_TRANSPORT_OPTIONS must be a JSON object, got {raw_options!r}")
    return {
        "broker_url": environ.get("CELERY_BROKER_URL") or DEFAULT_URL,
        "result_backend": environ.get("CELERY_RESULT_BACKEND") or DEFAULT_URL,
        "broker_transport_options": options,
    }


app = Celery("example_project")
app.conf.update(
    task_serializer="json",
    result_serializer=os.environ.get("EXAMPLE_RESULT_SERIALIZER") or "json",
    accept_content=["json"],
    result_accept_content=["json", "msgpack"],
    task_routes={"example_project.*": {"queue": QUEUE}},
    broker_connection_retry_on_startup=True,
    result_expires=3600,
    # EXAMPLE_RESULT_EXTENDED=1: each stored result names its batch (GET /tasks/{id} shows it);
    # off by default, since the worker then stores results in the pool, not in bulk.
    result_extended=os.environ.get("EXAMPLE_RESULT_EXTENDED") == "1",
    **config_from_env(),
)
