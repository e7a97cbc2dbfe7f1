"""Plain Celery baseline: an ordinary ``add(x, y)`` task, default worker settings."""

from __future__ import annotations

from celery import Celery

from ._common import configure

app = Celery("bench_plain")
configure(app)


@app.task(name="bench.plain.add")
def add(x: int, y: int) -> int:
    return x + y
