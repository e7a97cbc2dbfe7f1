"""Batched tasks for the monitoring tests: events, result_extended metas, Prometheus metrics,
remote reconfiguration. ``TEST_METRICS_PORT`` turns the metrics endpoint on."""

from __future__ import annotations

import json
import os
import time

from celery_batched import BatchedTask, RetryItem

from ._common import make_app, redis_client

app = make_app("monitoring", result_extended=os.environ.get("TEST_RESULT_EXTENDED") == "1")
if os.environ.get("TEST_METRICS_PORT"):
    app.conf.batching_metrics_port = int(os.environ["TEST_METRICS_PORT"])

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
