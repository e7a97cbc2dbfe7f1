"""What the test apps share: broker and backend from the environment, JSON only."""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

BROKER = os.environ.get("TEST_BROKER_URL", "redis://127.0.0.1:6379/11")
BACKEND = os.environ.get("TEST_BACKEND_URL", "redis://127.0.0.1:6379/11")


def make_app(name: str, **settings: Any) -> Celery:
    app = Celery(name, broker=BROKER, backend=BACKEND)
    app.conf.update(
        task_serializer="json", result_serializer="json", accept_content=["json"],
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        **settings,
    )
    return app
