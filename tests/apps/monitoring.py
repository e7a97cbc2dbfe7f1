"""Batched tasks for the monitoring tests: events, result_extended metas, Prometheus metrics,
remote reconfiguration, tracing a failed item to its batch. ``TEST_METRICS_PORT`` turns the
metrics endpoint on (so do ``--batching-metrics-port`` and ``CELERY_BATCHED_METRICS_PORT``)."""

from __future__ import annotations

import json
import os
import time

import celery_batched
from celery_batched import BatchedTask, RetryItem

from ._common import make_app, redis_client

app = make_app("monitoring", result_extended=os.environ.get("TEST_RESULT_EXTENDED") == "1")
if os.environ.get("TEST_METRICS_PORT"):
    app.conf.batching_metrics_port = int(os.environ["TEST_METRICS_PORT"])

# The decorated tasks below bind when the app is finalized, after `celery worker` has read its
# options: this offers --batching-metrics-port now.
celery_batched.install(app)

_redis = redis_client()


@app.task(base=BatchedTask, max_batch_size=4, wait_ms=300, max_retries=5)
def scored(keys: list[str]) -> list[object]:
    """'fail*' items fail, 'retry*' items ask for one retry, the others succeed."""
    _redis.rpush("exec:scored", json.dumps({"keys": keys}))
    time.sleep(0.02)
    out: list[object] = []
    for key in keys:
        if key.startswith("fail"):
            out.append(ValueError(f"planned failure of {key}"))
        elif key.startswith("retry") and _redis.incr(f"tries:{key}") < 2:
            out.append(RetryItem(countdown=0.05))
        else:
            out.append(f"done:{key}")
    return out


@app.task(base=BatchedTask, max_batch_size=4, wait_ms=200)
def resizable(xs: list[int]) -> list[int]:
    _redis.rpush("exec:resizable", len(xs))
    return xs


def _check_all(xs: list[object]) -> list[str]:
    for x in xs:  # as a model would: one bad input and the whole call raises
        if not isinstance(x, str):
            raise ValueError(f"Unsupported input type: {type(x).__name__}")
    return [x.upper() for x in xs]  # type: ignore[union-attr]


@app.task(base=BatchedTask, max_batch_size=4, wait_ms=300)
def strict(xs: list[object]) -> list[str]:
    """Raises for the whole batch when one item is not a string."""
    return _check_all(xs)


@app.task(base=BatchedTask, max_batch_size=4, wait_ms=300, isolate_failures=True)
def strict_isolated(xs: list[object]) -> list[str]:
    """``strict`` with isolate_failures: only the bad item fails."""
    return _check_all(xs)


@app.task(base=BatchedTask, max_batch_size=4, wait_ms=50)
def gated(xs: list[int]) -> list[int]:
    """Waits while the Redis key ``gate`` is unset: the broker's backlog stays put meanwhile."""
    while not _redis.get("gate"):
        time.sleep(0.02)
    return xs


class Loaded(BatchedTask):
    """A class-based task whose setup() takes a while (a model load)."""

    name = "tests.apps.monitoring.loaded"
    max_batch_size = 4
    wait_ms = 50

    def setup(self) -> None:
        time.sleep(0.6)

    def run(self, xs: list[int]) -> list[int]:
        return xs


loaded = app.register_task(Loaded())
