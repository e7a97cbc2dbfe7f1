"""Time-limited batched tasks for the fault-injection tests, in an app of their own.

With Redis, a worker refuses to start when an item of a time-limited batched task could stay
unacknowledged past ``visibility_timeout`` (``worker_checks.check_visibility_timeout``); the
``faults`` app's 3 s (for fast redelivery after a kill) is far below that, so these tasks run
on Redis's default.
"""

from __future__ import annotations

import time

from celery_batched import BatchedTask

from ._common import make_app
from .faults import count_runs

app = make_app("limits", worker_cancel_long_running_tasks_on_connection_loss=False)


@app.task(base=BatchedTask, max_batch_size=10, wait_ms=200, soft_time_limit=0.5)
def soft_limited(xs: list[float]) -> list[float]:
    time.sleep(max(xs))
    return xs


@app.task(base=BatchedTask, max_batch_size=10, wait_ms=200, time_limit=1)
def hard_limited(xs: list[float]) -> list[float]:
    time.sleep(max(xs))
    count_runs(xs)
    return xs
