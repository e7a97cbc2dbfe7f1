"""Batched tasks for tests/test_behaviour.py. Every execution is recorded in Redis.

Environment switches, read at import (so a worker started with ``env=`` gets them):

* ``BEHAVIOUR_RESULT_SERIALIZER``: the app's ``result_serializer`` (default json).
* ``BEHAVIOUR_VISIBILITY_TIMEOUT``: Redis ``broker_transport_options["visibility_timeout"]``.
* ``BEHAVIOUR_RECORD_ACKS=1``: every acknowledgement path (kombu's ``Message.ack``, the virtual
  transport's ``QoS.ack``, celery_batched's bulk ``ack_many``) records the name of the thread it
  ran on in the Redis list ``ack-threads``.
"""

from __future__ import annotations

import json
import os
import threading
import time

from celery_batched import BatchedTask, RetryItem

from ._common import make_app, redis_client

_settings: dict[str, object] = {}
if os.environ.get("BEHAVIOUR_RESULT_SERIALIZER"):
    _settings["result_serializer"] = os.environ["BEHAVIOUR_RESULT_SERIALIZER"]
if os.environ.get("BEHAVIOUR_VISIBILITY_TIMEOUT"):
    _settings["broker_transport_options"] = {
        "visibility_timeout": float(os.environ["BEHAVIOUR_VISIBILITY_TIMEOUT"])}

app = make_app("behaviour")
app.conf.update(_settings)  # after make_app's defaults (it sets result_serializer itself)

_redis = redis_client()


def record(name: str, **data: object) -> None:
    """Record an execution (``t`` is CLOCK_MONOTONIC, comparable across processes)."""
    _redis.rpush(f"exec:{name}", json.dumps({"t": time.monotonic(), "pid": os.getpid(), **data}))


# --- setup() that fails once -------------------------------------------------------------------

class FlakySetup(BatchedTask):
    """setup() raises on its first call (counted in Redis), then works."""

    name = "behaviour.flaky_setup"
    max_batch_size = 8
    wait_ms = 300

    def setup(self) -> None:
        calls = _redis.incr("setup-calls")
        _redis.rpush("setup-pids", os.getpid())
        if calls == 1:
            raise RuntimeError("GPU not ready yet")
        self.offset = 1000

    def run(self, xs: list[int]) -> list[int]:
        record("flaky_setup", xs=xs)
        return [x + self.offset for x in xs]


flaky_setup = app.register_task(FlakySetup())


# --- wait_ms=0 ---------------------------------------------------------------------------------

@app.task(base=BatchedTask, max_batch_size=100, wait_ms=0)
def zero_wait(xs: list[int]) -> list[int]:
    record("zero_wait", xs=xs)
    return [x * 2 for x in xs]


# --- RetryItem past max_retries ----------------------------------------------------------------

@app.task(base=BatchedTask, max_batch_size=10, wait_ms=200)
def always_retry(keys: list[str]) -> list[object]:
    """'retry:*' items always ask for a retry (max_retries=2); 'retry-exc:*' pass an exc too."""
    record("always_retry", keys=keys)
    out: list[object] = []
    for key in keys:
        _redis.incr(f"tries:{key}")
        if key.startswith("retry:"):
            out.append(RetryItem(countdown=0.1, max_retries=2))
        elif key.startswith("retry-exc:"):
            out.append(RetryItem(exc=LookupError(f"still no answer for {key}"), countdown=0.1,
                                 max_retries=2))
        else:
            out.append(f"ok:{key}")
    return out


# --- acks_late=False vs True -------------------------------------------------------------------

def _slow(name: str, xs: list[int]) -> list[int]:
    _redis.set(f"running:{name}", time.monotonic())
    time.sleep(2.0)
    _redis.set(f"finished:{name}", time.monotonic())
    return [x + 1 for x in xs]


@app.task(base=BatchedTask, max_batch_size=4, wait_ms=100, acks_late=False)
def early_ack(xs: list[int]) -> list[int]:
    return _slow("early_ack", xs)


@app.task(base=BatchedTask, max_batch_size=4, wait_ms=100)
def late_ack(xs: list[int]) -> list[int]:
    return _slow("late_ack", xs)


# --- batching_stats ----------------------------------------------------------------------------

@app.task(base=BatchedTask, max_batch_size=4, wait_ms=300)
def counted(xs: list[int]) -> list[int]:
    record("counted", n=len(xs))
    return [-x for x in xs]


# --- per-item events ---------------------------------------------------------------------------

VECTOR = [i / 3 for i in range(384)]  # repr ~7,000 characters


@app.task(base=BatchedTask, max_batch_size=10, wait_ms=2000, max_retries=50)
def evented(keys: list[str]) -> list[object]:
    record("evented", keys=keys)
    out: list[object] = []
    for key in keys:
        if key.startswith("fail"):
            out.append(ValueError(f"planned failure of {key}"))
        elif key.startswith("retry"):
            tries = _redis.incr(f"tries:{key}")
            out.append(RetryItem(countdown=0.1) if tries < 2 else f"done:{key}:{tries}")
        elif key.startswith("vec"):
            out.append(VECTOR)
        else:
            out.append(f"done:{key}")
    return out


# --- one traceback per failing batch -----------------------------------------------------------

@app.task(base=BatchedTask, max_batch_size=4, wait_ms=5000)
def exploding(xs: list[int]) -> list[int]:
    record("exploding", xs=xs)
    raise RuntimeError(f"model blew up on {len(xs)} inputs")  # the user's frame


# --- rate_limit and ordinary tasks ------------------------------------------------------------

@app.task(base=BatchedTask, max_batch_size=10, wait_ms=50)
def doubled(xs: list[int]) -> list[int]:
    return [x * 2 for x in xs]


@app.task
def plain_double(x: int) -> int:
    return x * 2


# --- visibility_timeout check: a batched task with a time limit --------------------------------

@app.task(base=BatchedTask, max_batch_size=10, wait_ms=50, time_limit=10)
def limited(xs: list[int]) -> list[int]:
    return xs


# --- bulk submit -------------------------------------------------------------------------------

@app.task(base=BatchedTask, max_batch_size=100, wait_ms=20)
def pair_sum(xs: list[int], ys: list[int]) -> list[int]:
    return [x + y for x, y in zip(xs, ys)]


# --- acks on the consumer's thread ------------------------------------------------------------

@app.task(base=BatchedTask, max_batch_size=16, wait_ms=20)
def threaded(xs: list[int]) -> list[int]:
    time.sleep(0.005)
    return [x + 7 for x in xs]


def _record_ack_threads() -> None:
    """Wrap every path an acknowledgement can take so each call records its thread's name."""
    from kombu.message import Message
    from kombu.transport.virtual import base as virtual_base

    from celery_batched.worker import completion

    def recording(what: str, fn):  # noqa: ANN001, ANN202
        def wrapper(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            _redis.rpush("ack-threads", f"{what}:{threading.current_thread().name}")
            return fn(*args, **kwargs)
        wrapper.__wrapped__ = fn  # type: ignore[attr-defined]
        return wrapper

    Message.ack = recording("Message.ack", Message.ack)
    virtual_base.QoS.ack = recording("QoS.ack", virtual_base.QoS.ack)
    # completion.py does ``from ._kombu_redis import ack_many`` and calls it by that global name.
    completion.ack_many = recording("ack_many", completion.ack_many)


if os.environ.get("BEHAVIOUR_RECORD_ACKS") == "1":
    _record_ack_threads()
