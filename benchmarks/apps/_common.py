"""Settings shared by the benchmark apps (importable by any Celery >= 5.0, no celery_batched).

Broker and result backend come from ``BENCH_BROKER_URL`` / ``BENCH_BACKEND_URL`` (default: the
local Redis, db 13). When ``BENCH_READY_KEY`` is set, the worker writes ``time.time()`` to that
Redis key the moment it is ready (``worker_ready`` signal): the drain timings start there.
"""

from __future__ import annotations

import os
import time
from typing import Any

DEFAULT_URL = "redis://127.0.0.1:6379/13"
BROKER_URL = os.environ.get("BENCH_BROKER_URL") or DEFAULT_URL
BACKEND_URL = os.environ.get("BENCH_BACKEND_URL") or BROKER_URL


def configure(app: Any, **overrides: Any) -> None:
    """The shared settings; ``overrides`` replace any of them (``result_serializer=...``)."""
    settings: dict[str, Any] = {
        "broker_url": BROKER_URL,
        "result_backend": BACKEND_URL,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "broker_connection_retry_on_startup": True,
        "worker_hijack_root_logger": False,
        "result_expires": 3600,
    }
    settings.update(overrides)
    app.conf.update(settings)
    install_ready_marker()


_installed = False


def install_ready_marker() -> None:
    global _installed
    if _installed:
        return
    _installed = True
    from celery import signals

    @signals.worker_ready.connect(weak=False)
    def _mark_ready(sender: Any = None, **_: Any) -> None:
        key = os.environ.get("BENCH_READY_KEY")
        if not key:
            return
        import redis

        client = redis.Redis.from_url(BACKEND_URL)
        try:
            client.set(key, repr(time.time()), ex=3600)
        finally:
            client.close()
