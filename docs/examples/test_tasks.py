# test_tasks.py -- run with: pytest -p celery.contrib.pytest test_tasks.py
import pytest
from celery import Celery
from celery.contrib.testing.worker import start_worker

from celery_batched import BatchedTask


@pytest.fixture(scope="session")
def celery_config():
    return {"broker_url": "memory://", "result_backend": "cache+memory://",
            "broker_transport_options": {"polling_interval": 0.01}}


def test_batches_in_a_worker(celery_app, celery_worker):
    sizes = []

    @celery_app.task(base=BatchedTask, max_batch_size=8, wait_ms=100)
    def double(xs: list[int]) -> list[int]:
        sizes.append(len(xs))
        return [2 * x for x in xs]

    celery_worker.reload()
    assert double.delay(21).get(timeout=10) == 42
    assert double.map_items(range(8)).get(timeout=10) == [0, 2, 4, 6, 8, 10, 12, 14]
    assert 8 in sizes                    # the eight items ran as one call


@pytest.mark.celery(task_always_eager=True)
def test_eager_runs_each_item_alone(celery_app):
    seen = []

    @celery_app.task(base=BatchedTask, max_batch_size=8, wait_ms=100)
    def double(xs: list[int]) -> list[int]:
        seen.append(xs)
        return [2 * x for x in xs]

    assert double.delay(21).get() == 42
    assert double.map_items([1, 2]).get() == [2, 4]
    assert seen == [[21], [1], [2]]      # no buffering: one call per item


# A module-level app and task, as in your project.
app = Celery("proj", broker="memory://", backend="cache+memory://")
app.conf.broker_transport_options = {"polling_interval": 0.01}


@app.task(base=BatchedTask, max_batch_size=8, wait_ms=100)
def triple(xs: list[int]) -> list[int]:
    return [3 * x for x in xs]


def test_with_start_worker():
    with start_worker(app, perform_ping_check=False):
        assert triple.map_items([1, 2, 3]).get(timeout=10) == [3, 6, 9]
