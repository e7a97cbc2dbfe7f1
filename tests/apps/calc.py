"""Batched tasks used by the core tests. Every execution is recorded in Redis."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import sys
import time

from celery.worker.control import inspect_command

from celery_batched import BatchedTask, RetryItem

from ._common import make_app, redis_client

app = make_app(
    "calc",
    result_extended=os.environ.get("TEST_RESULT_EXTENDED") == "1",
    batching_gc_freeze=os.environ.get("TEST_GC_FREEZE", "1") == "1",
)
if "TEST_SWITCH_INTERVAL" in os.environ:  # "none" -> None; anything else as given (a string)
    _interval = os.environ["TEST_SWITCH_INTERVAL"]
    app.conf.batching_switch_interval = None if _interval == "none" else _interval

_redis = redis_client()


def record(name: str, **data: object) -> None:
    """Record an execution; ``t`` is CLOCK_MONOTONIC, shared by all processes on Linux, so tests
    can compare it with their own ``time.monotonic()`` even if the wall clock jumps."""
    _redis.rpush(f"exec:{name}", json.dumps({"t": time.monotonic(), "pid": os.getpid(), **data}))


@app.task(base=BatchedTask, max_batch_size=2, wait_ms=1000)
def batch_add(xs: list[int], ys: list[int]) -> list[int]:
    record("batch_add", xs=xs, ys=ys)
    return [x + y for x, y in zip(xs, ys)]


@app.task(base=BatchedTask, max_batch_size=2, wait_ms=1000)
async def async_add(xs: list[int], ys: list[int]) -> list[int]:
    await asyncio.sleep(0.01)
    record("async_add", xs=xs, ys=ys)
    return [x + y for x, y in zip(xs, ys)]


@app.task(base=BatchedTask, max_batch_size=4, wait_ms=60_000)
def sized(xs: list[int]) -> list[int]:
    record("sized", xs=xs)
    return [x * 10 for x in xs]


@app.task(base=BatchedTask, max_batch_size=1000, wait_ms=1000)
def timed(xs: list[int]) -> list[int]:
    record("timed", xs=xs)
    return [-x for x in xs]


@app.task(base=BatchedTask, max_batch_size=50, wait_ms=20)
def burst(xs: list[int]) -> list[int]:
    record("burst", n=len(xs))
    return [x + 1 for x in xs]


@app.task(base=BatchedTask, max_batch_size=50, wait_ms=500)
def backlog(xs: list[int]) -> list[int]:
    record("backlog", n=len(xs))
    return [x * 2 for x in xs]


@app.task(base=BatchedTask, max_batch_size=10, wait_ms=300)
def per_item(xs: list[int]) -> list[object]:
    record("per_item", xs=xs)
    return [ValueError(f"odd input {x}") if x % 2 else x for x in xs]


@app.task(base=BatchedTask, max_batch_size=10, wait_ms=300)
def raiser(xs: list[int]) -> list[int]:
    record("raiser", xs=xs)
    raise RuntimeError(f"model exploded on a batch of {len(xs)}")


@app.task(base=BatchedTask, max_batch_size=10, wait_ms=300)
def wrong_len(xs: list[int]) -> list[int]:
    return xs[:-1]


@app.task(base=BatchedTask, max_batch_size=10, wait_ms=300)
def kw(a: list[int], b: list[int], *, c: list[int]) -> list[int]:
    record("kw", a=a, b=b, c=c)
    return [x * 100 + y * 10 + z for x, y, z in zip(a, b, c)]


@app.task(base=BatchedTask, max_batch_size=10, wait_ms=300, bind=True)
def bound(self: BatchedTask, xs: list[int]) -> list[str]:
    return [f"{self.name}:{x}" for x in xs]


class Scaler(BatchedTask):
    """Class-based batched task: setup() once per process, run() over lists."""

    name = "calc.scaler"
    max_batch_size = 8
    wait_ms = 50

    def setup(self) -> None:
        _redis.rpush("setup:scaler", os.getpid())
        self.factor = 3

    def run(self, xs: list[int]) -> list[int]:
        record("scaler", n=len(xs))
        time.sleep(0.02)
        return [x * self.factor for x in xs]


scaler = app.register_task(Scaler())


@app.task(base=BatchedTask, max_batch_size=10, wait_ms=200, autoretry_for=(KeyError,),
          max_retries=2, retry_backoff=False, default_retry_delay=0)
def flaky(keys: list[str]) -> list[object]:
    """Fails an item with KeyError until it has been tried ``n`` times (key 'n:<id>')."""
    record("flaky", keys=keys)
    out: list[object] = []
    for key in keys:
        tries = _redis.incr(f"tries:{key}")
        need = int(key.split(":")[0])
        out.append(KeyError(key) if tries < need else f"ok:{key}:{tries}")
    return out


@app.task(base=BatchedTask, max_batch_size=10, wait_ms=200, max_retries=3)
def asks_retry(keys: list[str]) -> list[object]:
    out: list[object] = []
    for key in keys:
        tries = _redis.incr(f"tries:{key}")
        out.append(RetryItem(countdown=0.1) if tries < 2 else f"done:{key}")
    return out


@app.task(base=BatchedTask, max_batch_size=10, wait_ms=200)
def unencodable(xs: list[int]) -> list[object]:
    return [{x} if x == 0 else x for x in xs]


@app.task
def plain_add(x: int, y: int) -> int:
    return x + y


@app.task
def collect(value: object, key: str) -> None:
    _redis.rpush(key, json.dumps(value))


@app.task(base=BatchedTask, max_batch_size=10, wait_ms=50, autoretry_for=(KeyError,),
          max_retries=3, retry_backoff=1, retry_jitter=False)
def backoff(keys: list[str]) -> list[object]:
    """Fails each item with KeyError on its first two tries; records when each try ran."""
    out: list[object] = []
    for key in keys:
        _redis.rpush(f"tries-at:{key}", time.monotonic())
        out.append(KeyError(key) if _redis.llen(f"tries-at:{key}") < 3 else f"ok:{key}")
    return out


@app.task(base=BatchedTask, max_batch_size=100, wait_ms=50)
def slow_batch(xs: list[int]) -> list[int]:
    time.sleep(0.6)
    record("slow_batch", xs=xs)
    return xs


@app.task
def total(values: list[int]) -> int:
    return sum(values)


@app.task(base=BatchedTask, max_batch_size=4, wait_ms=100)
def frozen_objects(xs: list[int]) -> list[int]:
    """How many objects the garbage collector of this pool process has frozen (``interpreter.py``)."""
    return [gc.get_freeze_count()] * len(xs)


@inspect_command()
def interpreter_state(state: object) -> dict[str, float]:
    """The worker's main process (where remote-control commands run): objects frozen, and the
    GIL switch interval (``interpreter.py``)."""
    return {"frozen": gc.get_freeze_count(), "switch_interval": sys.getswitchinterval()}
