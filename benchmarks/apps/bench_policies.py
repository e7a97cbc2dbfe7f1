"""Batched tasks for ``benchmarks/policies.py``: a simulated model (sleep, the CPU free, as while
a GPU kernel runs) behind a fixed ``wait_ms`` and behind a ``max_latency_ms`` target; and the
example project's ``embed`` / ``embed_bucketed``."""

from __future__ import annotations

import os
import time

from celery import Celery

from celery_batched import BatchedTask

from ._common import configure

app = Celery("bench_policies")
configure(app)

#: Simulated model: a call costs FIXED_MS + PER_ITEM_MS per item of wall time.
FIXED_MS = float(os.environ.get("BENCH_SIM_FIXED_MS", "20"))
PER_ITEM_MS = float(os.environ.get("BENCH_SIM_PER_ITEM_MS", "0.5"))
MAX_BATCH = int(os.environ.get("BENCH_SIM_MAX_BATCH", "32"))
WAIT_MS = float(os.environ.get("BENCH_SIM_WAIT_MS", "50"))
TARGET_MS = float(os.environ.get("BENCH_SIM_TARGET_MS", "100"))


def _model(xs: list[int]) -> list[int]:
    time.sleep((FIXED_MS + PER_ITEM_MS * len(xs)) / 1000.0)
    return xs


@app.task(base=BatchedTask, name="bench.fixed_wait", max_batch_size=MAX_BATCH, wait_ms=WAIT_MS)
def fixed_wait(xs: list[int]) -> list[int]:
    return _model(xs)


@app.task(base=BatchedTask, name="bench.latency_target", max_batch_size=MAX_BATCH,
          max_latency_ms=TARGET_MS)
def latency_target(xs: list[int]) -> list[int]:
    return _model(xs)


#: ``priorities`` section: a bulk backlog and an urgent trickle share one process (Redis:
#: priority 0 is the most urgent, bulk is sent with 9).
PRIO_BATCH = int(os.environ.get("BENCH_PRIO_MAX_BATCH", "64"))
PRIO_WAIT_MS = float(os.environ.get("BENCH_PRIO_WAIT_MS", "20"))
URGENT_WAIT_MS = float(os.environ.get("BENCH_URGENT_WAIT_MS", "2"))


@app.task(base=BatchedTask, name="bench.shared_plain", max_batch_size=PRIO_BATCH,
          wait_ms=PRIO_WAIT_MS)
def shared_plain(xs: list[int]) -> list[int]:
    return _model(xs)


@app.task(base=BatchedTask, name="bench.shared_urgent", max_batch_size=PRIO_BATCH,
          wait_ms=PRIO_WAIT_MS, urgent_priority=0, urgent_wait_ms=URGENT_WAIT_MS)
def shared_urgent(xs: list[int]) -> list[int]:
    return _model(xs)
