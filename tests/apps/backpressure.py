"""A batched task whose producers refuse items while its queue holds 10 messages or more."""

from __future__ import annotations

from celery_batched import BatchedTask

from ._common import make_app

app = make_app("backpressure")


@app.task(base=BatchedTask, max_batch_size=8, wait_ms=20, max_backlog=10)
def double(xs: list[int]) -> list[int]:
    return [2 * x for x in xs]
