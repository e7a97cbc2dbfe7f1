"""Guarantees that are not a configuration x fault cell (those are ``tests/matrix/``): what a
pool process makes of split outputs, and what a worker refuses at start-up."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
from celery import Celery

from celery_batched import BatchedTask
from celery_batched.protocol import Outcome
from celery_batched.pool.execution import execute_batch
from celery_batched.worker.checks import check_visibility_timeout
from celery_batched.errors import WorkerConfigurationError

from .conftest import REDIS_URL


def _wire(args: tuple, task_name: str) -> tuple:
    headers = {"id": str(uuid.uuid4()), "task": task_name}
    return (headers, (args, {}, None), None, None, (None,) * 6)


def test_an_oom_split_of_padded_array_outputs_keeps_every_row():
    """After an out-of-memory split, each call pads its rows to its own longest input: the
    halves' arrays have different widths and must not fail the batch."""
    app = Celery("padded", broker=REDIS_URL, backend=REDIS_URL)
    app.conf.batching_gc_freeze = False  # setup() would freeze this test process's heap
    calls: list[int] = []

    @app.task(base=BatchedTask, max_batch_size=8, wait_ms=10)
    def padded(ns: list[int]) -> object:
        calls.append(len(ns))
        if len(ns) > 4:
            raise MemoryError("too many for the device")
        width = max(ns)
        return np.array([[1.0] * n + [0.0] * (width - n) for n in ns], dtype=np.float32)

    ns = [1, 2, 3, 4, 5, 6, 7, 8]
    reply = execute_batch(padded, [_wire((n,), padded.name) for n in ns])
    assert calls == [8, 4, 4], calls
    assert reply.codes == bytes([Outcome.STORE]) * len(ns), list(reply.codes)
    rows = [list(row) for row in reply.values]
    # Each row as its own call padded it: the first half to 4 wide, the second to 8.
    assert rows[0] == [1.0, 0.0, 0.0, 0.0]
    assert rows[3] == [1.0] * 4
    assert rows[4] == [1.0] * 5 + [0.0] * 3
    assert rows[7] == [1.0] * 8
    app.close()


class _Backend:
    retry_policy = {"max_retries": 20, "interval_start": 0, "interval_step": 1,
                    "interval_max": 1}


class _Conf(dict):
    def __getattr__(self, name: str) -> object:
        return self.get(name)


class _App:
    def __init__(self, visibility: float) -> None:
        self.conf = _Conf(broker_transport_options={"visibility_timeout": visibility},
                          task_time_limit=None, worker_prefetch_multiplier=4)
        self.backend = _Backend()


def _limited(time_limit: float) -> object:
    app = Celery("limited")

    @app.task(base=BatchedTask, max_batch_size=10, wait_ms=50, time_limit=time_limit,
              shared=False)
    def limited(xs: list[int]) -> list[int]:
        return xs

    return limited


def test_visibility_timeout_check_counts_queued_batches_and_store_retries():
    """An item waits for the batches queued ahead of it (up to processes + 2 batches of credit
    plus Celery's prefetch) and for the backend's retry policy before it is acknowledged: a
    visibility_timeout above wait_ms + time_limit alone still redelivers it."""
    task = _limited(10)
    # wait 0.05 + 10: the old check passed at 25 s. Held: 10 x 3 + 4 -> 4 batches, 4 rounds on
    # one process: 0.05 + 4 x 10 + the default retry policy's 19 s = 59.05 s.
    with pytest.raises(WorkerConfigurationError) as err:
        check_visibility_timeout(_App(25), [task], slots=1)
    message = str(err.value)
    assert "59.05s" in message and "4 x time_limit" in message and "retry_policy (19s)" in message
    check_visibility_timeout(_App(60), [task], slots=1)  # above the worst case: starts
    # Four processes: 10 x 6 + 16 -> 8 batches, 2 rounds: 0.05 + 20 + 19 = 39.05 s.
    with pytest.raises(WorkerConfigurationError, match="39.05s"):
        check_visibility_timeout(_App(39), [task], slots=4)
    check_visibility_timeout(_App(40), [task], slots=4)
