"""Batched tasks for the fault-injection tests. Broker from TEST_BROKER_URL (Redis or AMQP)."""

from __future__ import annotations

import os
import time

from celery_batched import BatchedTask

from ._common import BROKER, make_app, record_runs, redis_client

app = make_app(
    "faults",
    worker_cancel_long_running_tasks_on_connection_loss=False,
    broker_transport_options={
        # Redis: restore unacknowledged messages of a dead worker after 3 s, scanning every second.
        "visibility_timeout": 3,
        "unacked_restore_interval": 1,
        "unacked_restore_throttle": 1,
    } if BROKER.startswith("redis") else {},
)
# Settings a fault test picks through the environment of its worker.
if os.environ.get("TEST_PREFETCH_MULTIPLIER"):
    app.conf.worker_prefetch_multiplier = int(os.environ["TEST_PREFETCH_MULTIPLIER"])
if os.environ.get("TEST_DISABLE_PREFETCH"):
    app.conf.worker_disable_prefetch = True
if os.environ.get("TEST_BACKEND_RETRY_S"):  # give up storing a result after about this long
    app.conf.result_backend_transport_options = {"retry_policy": {
        "max_retries": 3, "interval_start": 0,
        "interval_step": float(os.environ["TEST_BACKEND_RETRY_S"]) / 3,
        "interval_max": float(os.environ["TEST_BACKEND_RETRY_S"]) / 3}}

_redis = redis_client()


def count_runs(xs: list[object]) -> None:
    record_runs(_redis, xs)


@app.task(base=BatchedTask, max_batch_size=20, wait_ms=50)
def slow_square(xs: list[int]) -> list[int]:
    time.sleep(float(_redis.get("delay") or 0.05))
    count_runs(xs)
    return [x * x for x in xs]


@app.task(base=BatchedTask, max_batch_size=10, wait_ms=2500)
def held(xs: list[int]) -> list[int]:
    """Flushes when full or after 2.5 s (under the 3 s visibility timeout): leaves a partly
    filled buffer to shut down on."""
    time.sleep(float(_redis.get("delay") or 0))
    count_runs(xs)
    return [x + 1000 for x in xs]


def _maybe_die(xs: list[int]) -> None:
    if -1 in xs and _redis.setnx("died", 1):
        os._exit(1)


@app.task(base=BatchedTask, max_batch_size=10, wait_ms=200, reject_on_worker_lost=True)
def die_requeue(xs: list[int]) -> list[int]:
    _maybe_die(xs)
    count_runs(xs)
    return [x * 2 for x in xs]


@app.task(base=BatchedTask, max_batch_size=10, wait_ms=200)
def die_fail(xs: list[int]) -> list[int]:
    _maybe_die(xs)
    count_runs(xs)
    return [x * 2 for x in xs]


@app.task(base=BatchedTask, max_batch_size=50, wait_ms=100)
def eta_square(xs: list[int]) -> list[int]:
    count_runs(xs)
    _redis.rpush("eta_runs", f"{time.monotonic()}:{len(xs)}")
    return [x * x for x in xs]


@app.task(base=BatchedTask, max_batch_size=100, wait_ms=1500)
def slow_flush(xs: list[str]) -> list[str]:
    count_runs(xs)
    return [x.upper() for x in xs]


@app.task(base=BatchedTask, max_batch_size=16, wait_ms=300, isolate_failures=True)
def isolating(xs: list[int]) -> list[int]:
    _redis.incr("calls")
    if any(x < 0 for x in xs):
        raise ValueError(f"negative input in a batch of {len(xs)}")
    return [x * 3 for x in xs]


@app.task(base=BatchedTask, max_batch_size=32, wait_ms=300, isolate_failures=True)
def catalogue(kinds: list[str], payloads: list[object]) -> object:
    """Misbehaves according to ``kind``; isolate_failures keeps the good items apart."""
    if "return-none" in kinds:
        return None
    if "return-generator" in kinds:
        return (p for p in payloads)
    if "return-dict" in kinds:
        return {k: p for k, p in zip(kinds, payloads)}
    if "return-short" in kinds:
        return list(payloads)[:-1]
    if "raise" in kinds:
        raise RuntimeError("asked to raise")
    out: list[object] = []
    for kind, payload in zip(kinds, payloads):
        if kind == "unencodable":
            out.append({1, 2, 3})
        elif kind == "bad-type":
            out.append(payload.upper())  # type: ignore[attr-defined]  # raises for a non-str
        elif kind == "large":
            out.append(len(payload))  # type: ignore[arg-type]
        else:
            out.append(payload)
    return out


@app.task(base=BatchedTask, max_batch_size=100, wait_ms=20)
def tally(xs: list[int]) -> list[int]:
    _redis.incrby("tally", len(xs))
    return xs
