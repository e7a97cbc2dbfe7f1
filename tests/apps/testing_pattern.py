"""A module-level batched task for ``celery.contrib.testing.worker.start_worker``
(``tests/test_testing_pattern.py``): an in-process worker, kombu's ``memory://`` broker, results
in the test Redis."""

from __future__ import annotations

from celery import Celery

from celery_batched import BatchedTask

from ._common import BACKEND

app = Celery("testing_pattern", broker="memory://", backend=BACKEND)
app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"])

#: The batches ``double`` was called with (the worker runs in the test's own process).
calls: list[list[int]] = []


@app.task(base=BatchedTask, max_batch_size=8, wait_ms=100, shared=False)  # this app's only
def double(xs: list[int]) -> list[int]:
    calls.append(list(xs))
    return [2 * x for x in xs]
