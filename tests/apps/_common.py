"""What the test apps share: broker and backend from the environment, JSON only."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import redis
from celery import Celery
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

BROKER = os.environ.get("TEST_BROKER_URL", "redis://127.0.0.1:6379/11")
BACKEND = os.environ.get("TEST_BACKEND_URL", "redis://127.0.0.1:6379/11")
#: Where the test tasks record their runs (the shared test Redis when the backend is a server a
#: fault test stops).
RECORD = os.environ.get("TEST_RECORD_URL", BACKEND)


def redis_client() -> redis.Redis:
    """The tasks' own Redis client (for recording runs); retries, since the fault tests kill
    every client connection and the tasks' bookkeeping must survive that like the worker does."""
    return redis.Redis.from_url(RECORD, retry=Retry(ExponentialBackoff(cap=0.5), 10),
                                retry_on_error=[redis.ConnectionError, redis.TimeoutError])


def record_runs(client: redis.Redis, xs: Iterable[object]) -> None:
    """Count executions per item in the hash ``runs`` (a duplicate shows as a count > 1) and
    append the batch's ``pid:size`` to the list ``batches``."""
    items = list(xs)
    with client.pipeline() as pipe:
        for x in items:
            pipe.hincrby("runs", str(x), 1)
        pipe.rpush("batches", f"{os.getpid()}:{len(items)}")
        pipe.execute()


def batch_sizes(client: redis.Redis) -> list[int]:
    """The sizes ``record_runs`` appended, in order."""
    return [int(b.split(b":")[1]) for b in client.lrange("batches", 0, -1)]


def make_app(name: str, **settings: Any) -> Celery:
    app = Celery(name, broker=BROKER, backend=BACKEND)
    app.conf.update(
        task_serializer="json", result_serializer="json", accept_content=["json"],
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        **settings,
    )
    return app
