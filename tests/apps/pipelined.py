"""A batched task with a slow result backend and a function that looks like a GPU model.

``SlowRedisBackend`` is Celery's Redis backend whose stores take 0.15 s longer and are timed;
the function sleeps 0.1 s per batch (the CPU free, as while a GPU kernel runs) and times its
calls. Both go to the shared test Redis, so a test can see whether the next call ran while an
earlier batch's results were still being stored. Result serializer from TEST_RESULT_SERIALIZER.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import numpy as np
from celery.backends.redis import RedisBackend

from celery_batched import BatchedTask

from ._common import BACKEND, make_app, redis_client

STORE_S = 0.15
CALL_S = 0.1

serializer = os.environ.get("TEST_RESULT_SERIALIZER", "json")
app = make_app("pipelined")
app.conf.update(result_serializer=serializer, result_accept_content=["json", "msgpack"],
                result_backend="tests.apps.pipelined.SlowRedisBackend+" + BACKEND,
                result_extended=os.environ.get("TEST_RESULT_EXTENDED") == "1")

_redis = redis_client()


class SlowRedisBackend(RedisBackend):
    """Stores take ``STORE_S`` longer; each store's (start, end) goes to ``pipeline:stores``."""

    def ensure(self, fun: Any, args: Any, **policy: Any) -> Any:
        start = time.monotonic()
        time.sleep(STORE_S)
        try:
            return super().ensure(fun, args, **policy)
        finally:
            _redis.rpush("pipeline:stores", json.dumps([start, time.monotonic()]))


@app.task(base=BatchedTask, max_batch_size=16, wait_ms=5)
def vectors(xs: list[int]) -> Any:
    """One 384-float row per item (row i is x_i everywhere), as a model's encode would return."""
    start = time.monotonic()
    time.sleep(CALL_S)
    _redis.rpush("pipeline:calls", json.dumps([start, time.monotonic(), len(xs)]))
    return np.repeat(np.asarray(xs, dtype=np.float32)[:, None], 384, axis=1)


@app.task(base=BatchedTask, max_batch_size=16, wait_ms=5)
def tensor_rows(xs: list[int]) -> Any:
    """A torch tensor in bfloat16, one row per item (NumPy has no bfloat16)."""
    import torch

    return torch.tensor(xs, dtype=torch.bfloat16)[:, None].repeat(1, 4) / 2


@app.task(base=BatchedTask, max_batch_size=16, wait_ms=5)
def numpy_list(xs: list[int]) -> list[Any]:
    """A list of NumPy rows and scalars, as ``list(model.encode(texts))`` gives."""
    return [np.float32(x) if x % 2 else np.arange(3, dtype=np.int64) + x for x in xs]
