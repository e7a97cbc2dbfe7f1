"""The configuration x fault matrix's app (``tests/matrix/``): one app, configured per cell.

``MATRIX_CONFIG`` (JSON) holds the cell's Celery settings -- broker and backend URLs, their
transport options, ``result_extended``, ``track_started``, the queue (a quorum queue where the
cell says so) -- so one module serves every broker, backend and pool the matrix runs. Each
task records every run of every item (``runs``: item -> count) and every batch's size in the
shared test Redis (``TEST_RECORD_URL``), which the cells' faults never touch; each call
of the function appends its size to ``calls``.

Item kinds (the first argument) say what the function does with that item:

* ``ok`` -- returns ``x * 2``;
* ``fail`` -- its position holds a ``ValueError`` (the item fails alone);
* ``retry`` -- ``RetryItem`` on its first run, ``x * 2`` after; ``retry3`` on its first three;
* ``autoretry`` -- raises ``KeyError`` inside the task's ``autoretry_for`` on its first run;
* ``oom`` -- the call raises ``MemoryError`` while this item is in it: the batch is split
  down to the item, which fails alone;
* ``die`` -- the pool process exits (``os._exit``) on the item's first run;
* ``slow`` -- the call sleeps 1.5 s (``limited``'s soft time limit is 1 s); ``stuck`` too, and
  goes on sleeping after the soft time limit (only the hard one, 2.5 s, ends it);
* ``unencodable`` -- its result is a set, which JSON can't encode.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from celery import Celery
from celery.exceptions import SoftTimeLimitExceeded
from kombu import Queue

from celery_batched import BatchedTask, RetryItem

from ._common import record_runs
from ._common import redis_client as _record_client

CONFIG: dict[str, Any] = json.loads(os.environ.get("MATRIX_CONFIG") or "{}")
QUEUE = CONFIG.get("queue", "matrix")

app = Celery("matrix", broker=CONFIG.get("broker", "redis://127.0.0.1:6379/11"),
             backend=CONFIG.get("backend", "redis://127.0.0.1:6379/11"))
app.conf.update(
    task_serializer="json", result_serializer="json", accept_content=["json"],
    broker_connection_retry_on_startup=True, worker_hijack_root_logger=False,
    worker_cancel_long_running_tasks_on_connection_loss=False,
    task_default_queue=QUEUE,
    **CONFIG.get("settings", {}),
)
if CONFIG.get("quorum"):
    app.conf.task_queues = [Queue(QUEUE, queue_arguments={"x-queue-type": "quorum"},
                                  durable=True)]

_record = _record_client()  # TEST_RECORD_URL: the shared test Redis


def _first_run(x: int) -> bool:
    return bool(_record.hsetnx("first", str(x), 1))


def _run(kinds: list[str], xs: list[int]) -> list[Any]:
    if "oom" in kinds:
        raise MemoryError(f"{len(kinds)} items don't fit")
    if "die" in kinds and any(_first_run(x) for k, x in zip(kinds, xs) if k == "die"):
        os._exit(1)
    _record.rpush("calls", len(xs))
    if "slow" in kinds or "stuck" in kinds:
        try:
            time.sleep(1.5)
        except SoftTimeLimitExceeded:
            if "stuck" not in kinds:
                raise
            time.sleep(5)  # ignores the soft limit: only the hard one ends it
    record_runs(_record, xs)
    out: list[Any] = []
    for kind, x in zip(kinds, xs):
        if kind == "fail":
            out.append(ValueError(f"item {x} fails"))
        elif kind == "retry" and _first_run(x):
            out.append(RetryItem(countdown=0.2))
        elif kind == "retry3" and _record.hincrby("tries", str(x), 1) <= 3:
            out.append(RetryItem(countdown=0.2))  # up to the task's max_retries (3)
        elif kind == "unencodable":
            out.append({x})
        elif kind == "autoretry" and _first_run(x):
            out.append(KeyError(f"item {x}: try again"))
        else:
            out.append(x * 2)
    return out


_OPTIONS: dict[str, Any] = {"base": BatchedTask, "max_batch_size": 16, "wait_ms": 100,
                            "autoretry_for": (KeyError,),
                            "retry_kwargs": {"countdown": 0.2, "max_retries": 3},
                            **CONFIG.get("task_options", {})}

work = app.task(name="matrix.work", **_OPTIONS)(_run)
limited = app.task(name="matrix.limited", soft_time_limit=1.0, time_limit=2.5,
                   **_OPTIONS)(_run)


@app.task(name="matrix.total")
def total(values: list[int]) -> int:
    """A chord's body: the header's items are stored by the pool (chord part-returns)."""
    return sum(values)
