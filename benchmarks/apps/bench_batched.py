"""celery_batched side of the benchmarks: batched ``add`` tasks (one list per parameter)."""

from __future__ import annotations

from celery import Celery

from celery_batched import BatchedTask

from ._common import configure

app = Celery("bench_batched")
configure(app)


# Drain / RSS benchmark: a full batch as soon as 100 items are buffered, else after 20 ms.
@app.task(name="bench.batched.add", base=BatchedTask, max_batch_size=100, wait_ms=20)
def add(xs: list[int], ys: list[int]) -> list[int]:
    return [x + y for x, y in zip(xs, ys)]


# Latency benchmark: the same function with different wait_ms.
@app.task(name="bench.batched.add_w0", base=BatchedTask, max_batch_size=100, wait_ms=0)
def add_w0(xs: list[int], ys: list[int]) -> list[int]:
    return [x + y for x, y in zip(xs, ys)]


@app.task(name="bench.batched.add_w5", base=BatchedTask, max_batch_size=100, wait_ms=5)
def add_w5(xs: list[int], ys: list[int]) -> list[int]:
    return [x + y for x, y in zip(xs, ys)]


@app.task(name="bench.batched.add_w50", base=BatchedTask, max_batch_size=100, wait_ms=50)
def add_w50(xs: list[int], ys: list[int]) -> list[int]:
    return [x + y for x, y in zip(xs, ys)]


LATENCY_TASKS = {0: add_w0, 5: add_w5, 50: add_w50}
