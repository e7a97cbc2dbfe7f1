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


# Latency benchmark's reference: an ordinary task in the same worker (same consumer, same pool),
# measured interleaved with the batched ones.
@app.task(name="bench.batched.plain_add")
def plain_add(x: int, y: int) -> int:
    return x + y


# Bulk benchmark: a one-parameter task for map_items (ItemResults.get() over many results).
@app.task(name="bench.batched.inc", base=BatchedTask, max_batch_size=100, wait_ms=20)
def inc(xs: list[int]) -> list[int]:
    return [x + 1 for x in xs]
