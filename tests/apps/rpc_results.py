"""Batched tasks whose results go to Celery's ``rpc://`` backend (``tests/test_rpc_backend.py``).

The broker comes from ``TEST_BROKER_URL`` (a RabbitMQ vhost of the test's own, or Redis); the
result backend is always ``rpc://``: results travel back as messages on the caller's reply queue.
"""

from __future__ import annotations

from celery_batched import BatchedTask

from ._common import make_app

app = make_app("rpc_results")
app.conf.result_backend = "rpc://"


@app.task(base=BatchedTask, max_batch_size=16, wait_ms=50)
def triple(xs: list[int]) -> list[int]:
    return [x * 3 for x in xs]


@app.task(base=BatchedTask, max_batch_size=16, wait_ms=50)
def pair_sum(xs: list[int], ys: list[int]) -> list[int]:
    return [x + y for x, y in zip(xs, ys)]
