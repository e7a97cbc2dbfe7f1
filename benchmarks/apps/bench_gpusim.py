"""A simulated GPU model: a batched task whose call only sleeps, as the CPU does while a kernel runs.

``bench.gpusim.model`` sleeps ``F + P x batch size`` milliseconds (``BENCH_GPUSIM_F_MS``, default
40; ``BENCH_GPUSIM_P_MS``, default 0.25) and returns one 384-float row per item as a 2-D float32
NumPy array, like ``model.encode(..., convert_to_numpy=True)``. ``bench.gpusim.free`` returns the
same rows without sleeping: what the worker itself costs for vector results. Row *i* is
:func:`expected_row` of item *i*'s input, so every stored result can be checked.

``BENCH_GPUSIM_DEVICE`` names a lock file that stands for one GPU: every worker given the same
file serializes its calls' sleeps on it (``fcntl.flock``), as one GPU serializes the kernels of
the processes that share it, so several workers on one simulated device never beat its limit.

``BENCH_RESULT_SERIALIZER`` (default ``msgpack``) picks the worker's result serializer; clients
build an app with the same serializer with :func:`make_app` (a backend decodes results with its
own app's serializer).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
from celery import Celery

from celery_batched import BatchedTask

from ._common import configure

MAX_BATCH_SIZE = 128
WAIT_MS = 5
DIMENSIONS = 384
MODEL_TASK = "bench.gpusim.model"
FREE_TASK = "bench.gpusim.free"
# Exact in float32 for inputs below 2**21: the stored values compare equal to expected_row's.
_OFFSETS = np.arange(DIMENSIONS, dtype=np.float32) * np.float32(0.25)


def fixed_ms() -> float:
    return float(os.environ.get("BENCH_GPUSIM_F_MS", "40"))


def per_item_ms() -> float:
    return float(os.environ.get("BENCH_GPUSIM_P_MS", "0.25"))


@contextlib.contextmanager
def device() -> Iterator[None]:
    """Hold the simulated GPU (``BENCH_GPUSIM_DEVICE``) for one call; nothing if unset."""
    path = os.environ.get("BENCH_GPUSIM_DEVICE")
    if not path:
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def rows(xs: list[int]) -> np.ndarray:
    """One row per item: ``x + 0.25 * j`` for j in 0..383 (float32)."""
    return np.asarray(xs, dtype=np.float32)[:, None] + _OFFSETS[None, :]


def expected_row(x: int) -> list[float]:
    return [float(x) + 0.25 * j for j in range(DIMENSIONS)]


def make_app(serializer: str) -> Celery:
    """An app with both tasks whose results use ``serializer`` (``msgpack`` or ``json``)."""
    app = Celery(f"bench_gpusim_{serializer}")
    configure(app, result_serializer=serializer, result_accept_content=["json", "msgpack"])
    f_ms, p_ms = fixed_ms(), per_item_ms()

    # shared=False: a later app must not adopt an earlier one's functions (Celery's shared tasks).
    @app.task(name=MODEL_TASK, base=BatchedTask, max_batch_size=MAX_BATCH_SIZE, wait_ms=WAIT_MS,
              shared=False)
    def model(xs: list[int]) -> Any:
        with device():
            time.sleep((f_ms + p_ms * len(xs)) / 1000.0)  # the "GPU" runs; this process idles
        return rows(xs)

    @app.task(name=FREE_TASK, base=BatchedTask, max_batch_size=MAX_BATCH_SIZE, wait_ms=WAIT_MS,
              shared=False)
    def free(xs: list[int]) -> Any:
        return rows(xs)

    return app


app = make_app(os.environ.get("BENCH_RESULT_SERIALIZER", "msgpack"))
