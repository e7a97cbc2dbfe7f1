"""How users test their batched tasks: docs/testing.md.

* Celery's documented pattern (``celery.contrib.pytest``): the ``celery_app`` and
  ``celery_worker`` fixtures, a batched task defined inside the test, ``celery_worker.reload()``,
  ``.delay().get()``. The embedded worker's consumer was built before the task -- and so before
  the batching bootstep -- existed: the step is attached to the running consumer then, and
  started on the consumer's thread by the first message.
* ``celery.contrib.testing.worker.start_worker(app)`` with a module-level batched task.
* ``task_always_eager``: one item at a time, as a batch of one.
* The page's example itself (docs/examples/test_tasks.py) runs in tests/test_docs.py, with the
  docs' other examples.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from celery import bootsteps, signals
from celery.contrib.testing.worker import start_worker

from celery_batched import BatchedTask
from celery_batched.worker.bootstep import BatchingStep
from celery_batched.worker.service import BatchingService

from .conftest import REDIS_URL


#: kombu's in-process broker (no event loop: Celery's synloop) and Redis (an event loop), set
#: with the ``celery`` mark that ``celery_app`` reads.
BROKERS = [pytest.param(url, marks=pytest.mark.celery(broker_url=url), id=name)
           for name, url in (("memory", "memory://"), ("redis", REDIS_URL))]


@pytest.fixture(scope="module")
def celery_config() -> dict:
    """Results in the test Redis: Celery's default test backend, ``cache+memory://``, is
    not used here (see ``test_cache_memory_backend``)."""
    return {"result_backend": REDIS_URL, "task_serializer": "json",
            "result_serializer": "json", "accept_content": ["json"]}


@pytest.fixture(autouse=True)
def _clean_redis(redis_client) -> None:
    """A fresh test Redis (the default ``celery`` queue of the Redis-broker variant included)."""


@pytest.fixture(autouse=True)
def _event_loop_released() -> Iterator[None]:
    """A stopped embedded worker leaves no event loop behind: ``Hub.close`` clears kombu's
    process-wide loop last, and the next embedded worker would reuse a closed one if an
    ``on_close`` callback raised before (the next test's results then never arrive)."""
    from kombu.asynchronous import get_event_loop, set_event_loop

    yield
    left = get_event_loop()
    if left is not None:
        set_event_loop(None)
        pytest.fail(f"the stopped worker left kombu's event loop set ({left!r}): an on_close "
                    f"callback raised in Hub.close (see the log: 'Error on terminating Hub')")


@pytest.fixture
def no_batching_yet(celery_app) -> None:
    """The worker about to start knows no batched task. Every app finalized in this process
    gets the shared tasks of every module imported so far -- other test modules' batched ones
    among them, which would install the batching step before the worker is built."""
    celery_app.finalize()
    for name in [n for n, t in celery_app.tasks.items() if isinstance(t, BatchedTask)]:
        del celery_app.tasks[name]
    celery_app.steps["consumer"].discard(BatchingStep)


def _batching_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("celery-batched-")}


@pytest.mark.parametrize("broker", BROKERS)
def test_celery_docs_pattern_task_defined_in_the_test(broker, celery_app, no_batching_yet,
                                                      celery_worker) -> None:
    # celery_worker started before any batched task existed: its consumer has no batching step.
    assert getattr(celery_worker.consumer, "batching", None) is None
    calls: list[list[int]] = []

    @celery_app.task(base=BatchedTask, max_batch_size=8, wait_ms=200)
    def double(xs: list[int]) -> list[int]:
        calls.append(list(xs))
        return [2 * x for x in xs]

    @celery_app.task(base=BatchedTask, max_batch_size=4, wait_ms=50)
    def pair_sum(xs: list[int], ys: list[int]) -> list[int]:
        return [x + y for x, y in zip(xs, ys)]

    celery_worker.reload()
    consumer_threads: set[int] = set()

    def on_received(**_: object) -> None:  # Celery sends task_received on the consumer's thread
        consumer_threads.add(threading.get_ident())

    signals.task_received.connect(on_received, weak=False)
    try:
        assert double.delay(21).get(timeout=20) == 42
    finally:
        signals.task_received.disconnect(on_received)
    results = double.map_items(range(8))
    assert results.get(timeout=20) == [2 * i for i in range(8)]
    assert [8] in [[len(c)] for c in calls], calls  # batched: one call of 8 items
    assert pair_sum.starmap_items([(1, 2), (3, 4)]).get(timeout=20) == [3, 7]
    service = celery_worker.consumer.batching
    steps = [s for s in celery_worker.consumer.steps if isinstance(s, BatchingStep)]
    assert isinstance(service, BatchingService) and [s.service for s in steps] == [service]
    assert celery_worker.consumer.steps[-1].last  # still before the event loop's step
    # Started on the consumer's thread, not on the test's (where reload() ran).
    assert service.thread is not None
    assert {service.thread.ident} == consumer_threads != {threading.get_ident()}


@pytest.mark.parametrize("broker", BROKERS)
def test_late_attached_step_stops_with_the_worker(broker, celery_app, no_batching_yet) -> None:
    before = _batching_threads()
    with start_worker(celery_app, perform_ping_check=False, shutdown_timeout=30) as worker:
        assert getattr(worker.consumer, "batching", None) is None
        @celery_app.task(base=BatchedTask, max_batch_size=4, wait_ms=50)
        def negate(xs: list[int]) -> list[int]:
            return [-x for x in xs]

        worker.reload()
        assert negate.map_items(range(6)).get(timeout=20) == [0, -1, -2, -3, -4, -5]
        service = worker.consumer.batching
        assert _batching_threads() - before  # its writer (and runner) threads run
        stopped = []
        shutdown = service.shutdown
        service.shutdown = lambda: (stopped.append(service), shutdown())
    assert stopped == [service]  # the worker's shutdown reached the late step
    for thread in _batching_threads() - before:
        thread.join(10)
        assert not thread.is_alive(), thread


@pytest.mark.parametrize("broker", BROKERS)
def test_step_attached_while_the_worker_starts(broker, celery_app, no_batching_yet) -> None:
    """A batched task the app knows, a blueprint built without the step (no_batching_yet
    removed it after the task was bound): the consumer's Tasks step builds the strategy while
    the blueprint starts, and the blueprint starts the attached step in order."""
    @celery_app.task(base=BatchedTask, max_batch_size=4, wait_ms=50, shared=False)
    def square(xs: list[int]) -> list[int]:
        return [x * x for x in xs]

    celery_app.steps["consumer"].discard(BatchingStep)  # square's binding added it again
    with start_worker(celery_app, perform_ping_check=False, shutdown_timeout=30) as worker:
        consumer = worker.consumer
        step, = (s for s in consumer.steps if isinstance(s, BatchingStep))
        assert consumer.batching is step.service and step.service.thread is not None  # started
        assert consumer.steps.index(step) == len(consumer.steps) - 2  # before the event loop
        assert consumer.blueprint.started == len(consumer.steps)
        assert square.map_items(range(6)).get(timeout=20) == [x * x for x in range(6)]


@pytest.mark.parametrize("consumer", [
    pytest.param(SimpleNamespace(batching=None), id="not-a-celery-consumer"),
    pytest.param(SimpleNamespace(batching=None, steps=[],
                                 blueprint=SimpleNamespace(state=bootsteps.CLOSE)), id="stopping"),
])
def test_no_step_can_be_attached_error_says_what_to_do(consumer) -> None:
    from celery_batched import BatchingNotInstalledError
    from celery_batched.worker.strategy import batching_strategy

    task = SimpleNamespace(name="proj.embed")
    with pytest.raises(BatchingNotInstalledError, match=r"proj.embed .* none can be attached .*"
                       r"app.steps\['consumer'\].add\(celery_batched.BatchingStep\)"):
        batching_strategy(task, None, consumer)
    assert consumer.batching is None


def test_start_worker_with_a_module_level_task() -> None:
    from .apps import testing_pattern as tp

    tp.calls.clear()
    with start_worker(tp.app, perform_ping_check=False):
        assert tp.double.map_items([1, 2, 3]).get(timeout=20) == [2, 4, 6]
        assert tp.double.delay(5).get(timeout=20) == 10
    assert [1, 2, 3] in tp.calls


@pytest.mark.celery(task_always_eager=True)
def test_task_always_eager_runs_single_item_batches(celery_app) -> None:
    calls: list[list[int]] = []

    @celery_app.task(base=BatchedTask, max_batch_size=8, wait_ms=1000)
    def double(xs: list[int]) -> list[int]:
        calls.append(list(xs))
        return [ValueError(f"odd {x}") if x == 13 else 2 * x for x in xs]

    assert double.delay(21).get() == 42
    assert double.map_items([1, 2, 3]).get(timeout=10) == [2, 4, 6]
    assert double(4) == 8  # the item-level call
    assert double.run([1, 2]) == [2, 4]  # the list function itself
    with pytest.raises(ValueError, match="odd 13"):
        double.delay(13).get()
    assert calls == [[21], [1], [2], [3], [4], [1, 2], [13]]  # no buffering: batches of one


@pytest.mark.celery(result_backend="cache+memory://")
def test_cache_memory_backend(celery_app, celery_worker) -> None:
    """Celery's default test backend (``cache+memory://``, also memcached)."""
    @celery_app.task(base=BatchedTask, max_batch_size=8, wait_ms=50)
    def double(xs: list[int]) -> list[int]:
        return [2 * x for x in xs]

    celery_worker.reload()
    assert double.delay(21).get(timeout=5) == 42
