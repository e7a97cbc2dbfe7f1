"""Batched tasks with batching policies: keys, costs, a latency target, split on OOM.

Every call of a function is recorded in Redis (``exec:<name>``) with the batch it got.
"""

from __future__ import annotations

import json
import os
import time

from celery_batched import BatchedTask

from ._common import make_app, redis_client

# On RabbitMQ, priorities need queues declared with x-max-priority (TEST_QUEUE_MAX_PRIORITY).
app = make_app("policies",
               task_queue_max_priority=int(os.environ.get("TEST_QUEUE_MAX_PRIORITY", 0)) or None)
_redis = redis_client()


def record(name: str, **data: object) -> None:
    _redis.rpush(f"exec:{name}", json.dumps({"t": time.monotonic(), "pid": os.getpid(), **data}))


@app.task(base=BatchedTask, batch_key="model", max_batch_size=4, wait_ms=300)
def by_model(model: list[str], xs: list[int]) -> list[str]:
    record("by_model", model=model, xs=xs)
    return [f"{m}:{x}" for m, x in zip(model, xs)]


def length_bucket(text: str) -> int:
    if text == "boom":
        raise ValueError("no bucket for 'boom'")
    if text == "unhashable":
        return [1]  # type: ignore[return-value]
    return min(len(text) // 10, 3)


@app.task(base=BatchedTask, batch_key=length_bucket, max_batch_size=50, wait_ms=300)
def by_length(texts: list[str]) -> list[int]:
    record("by_length", texts=texts)
    return [len(t) for t in texts]


@app.task(base=BatchedTask, batch_key="k", max_open_keys=2, max_batch_size=100, wait_ms=1500)
def few_keys(k: list[str], xs: list[int]) -> list[int]:
    record("few_keys", k=k, xs=xs)
    return xs


@app.task(base=BatchedTask, batch_cost=len, max_batch_cost=100, max_batch_size=50, wait_ms=300)
def costly(texts: list[str]) -> list[int]:
    record("costly", cost=sum(len(t) for t in texts), n=len(texts))
    return [len(t) for t in texts]


def _oom(message: str) -> BaseException:
    import torch
    return torch.cuda.OutOfMemoryError(message)


@app.task(base=BatchedTask, max_batch_size=32, wait_ms=5000)
def fits_eight(xs: list[int]) -> list[int]:
    """Runs out of (simulated) GPU memory above 8 items, and in any call with item -1."""
    ok = len(xs) <= 8 and -1 not in xs
    record("fits_eight", n=len(xs), ok=ok)
    if not ok:
        raise _oom(f"CUDA out of memory. Tried to allocate {len(xs)} GiB")
    return [x * 2 for x in xs]


@app.task(base=BatchedTask, max_latency_ms=300, max_batch_size=16)
def latency_target(xs: list[int]) -> list[int]:
    record("latency_target", xs=xs)
    time.sleep(0.05)
    return xs


@app.task(base=BatchedTask, preferred_batch_sizes=(4, 8), max_batch_size=8, wait_ms=1000)
def fixed_shapes(xs: list[int]) -> list[int]:
    """An engine built for batches of 4 and 8: records each call's items and padded size."""
    record("fixed_shapes", xs=xs, padded=fixed_shapes.padded_size(len(xs)))
    return [x * 3 for x in xs]


@app.task(base=BatchedTask, urgent_priority=0, urgent_wait_ms=0, max_batch_size=4, wait_ms=200)
def shared_gpu(xs: list[int]) -> list[int]:
    """Interactive (priority 0, Redis: most urgent) and bulk work (priority 9) on one process:
    records each call's items in the order the calls ran."""
    record("shared_gpu", xs=xs)
    time.sleep(0.3)
    return xs


@app.task(base=BatchedTask, urgent_priority=5, urgent_wait_ms=0, max_batch_size=4, wait_ms=200)
def shared_gpu_amqp(xs: list[int]) -> list[int]:
    """``shared_gpu`` for RabbitMQ, where higher priorities are the more urgent."""
    record("shared_gpu_amqp", xs=xs)
    time.sleep(0.3)
    return xs
