"""Backpressure at submit (``max_backlog``): producers refuse items while the queue is long.

Real brokers: the Redis test database and a RabbitMQ vhost of the test's own; the queue's
length is read as the broker reports it, and one test drains the queue with a real worker.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
from celery import Celery

from celery_batched import Backpressure, BatchedTask, BatchedTaskOptionError
from celery_batched.client import backlog

from .conftest import REDIS_URL
from .servers import RabbitVhost


def _app(broker: str) -> Celery:
    app = Celery(f"bp{uuid.uuid4().hex[:6]}", broker=broker, backend=REDIS_URL)
    app.conf.update(task_serializer="json", accept_content=["json"],
                    broker_connection_retry_on_startup=True)
    return app


def _task(app: Celery, max_backlog: int | None) -> BatchedTask:
    @app.task(base=BatchedTask, max_batch_size=8, wait_ms=10, max_backlog=max_backlog,
              name="bp.double", shared=False)
    def double(xs: list[int]) -> list[int]:
        return [2 * x for x in xs]

    return double  # type: ignore[return-value]


@pytest.fixture(params=["redis", "rabbitmq"])
def broker(request) -> Iterator[tuple[str, str]]:
    """(broker url, a queue name of this test's own)."""
    queue = f"bp{uuid.uuid4().hex[:8]}"
    if request.param == "redis":
        yield REDIS_URL, queue
        return
    vhost = RabbitVhost().create()
    try:
        yield vhost.url(), queue
    finally:
        vhost.delete()


def _count(app: Celery, queue: str) -> int:
    """What the broker says waits in ``queue``."""
    from celery_batched._internals.client import queue_messages

    with app.connection_for_write() as conn:
        return queue_messages(conn.channel(), queue)


def test_items_past_the_bound_are_refused_and_not_sent(broker, redis_client) -> None:
    url, queue = broker
    app = _app(url)
    task = _task(app, max_backlog=5)
    for i in range(5):
        task.apply_async((i,), queue=queue)
    with pytest.raises(Backpressure) as err:
        task.apply_async((5,), queue=queue)
    exc = err.value
    assert (exc.task, exc.queue, exc.backlog, exc.max_backlog) == ("bp.double", queue, 5, 5)
    assert exc.retry_after is None  # nothing drained yet: no estimate
    assert f"queue {queue!r} holds 5 messages, and max_backlog is 5: the item was not sent. Retry in a few seconds" in str(exc)
    # A bulk send is admitted or refused whole, against the broker's own count.
    time.sleep(backlog.REFRESH_S)
    with pytest.raises(Backpressure, match="these 2 items were not sent"):
        task.map_items([6, 7], queue=queue)
    assert _count(app, queue) == 5
    # Per call: another bound, or none.
    task.apply_async((8,), queue=queue, max_backlog=100)
    task.map_items([9, 10], queue=queue, max_backlog=None)
    assert _count(app, queue) == 8


def test_a_missing_queue_holds_nothing(broker) -> None:
    url, queue = broker
    app = _app(url)
    task = _task(app, max_backlog=1)
    task.apply_async((1,), queue=queue)  # the queue didn't exist when its length was read
    with pytest.raises(Backpressure):
        task.apply_async((2,), queue=queue)


def test_retry_after_follows_the_measured_drain(redis_client, queue) -> None:
    app = _app(REDIS_URL)
    task = _task(app, max_backlog=10)
    task.map_items(range(10), queue=queue)
    for _ in range(5):  # a consumer takes five, as a worker would
        redis_client.rpop(queue)
    time.sleep(0.6)
    task.map_items(range(5), queue=queue)  # this read measures the drain: 5 in ~0.6 s
    time.sleep(0.6)
    with pytest.raises(Backpressure) as err:
        task.apply_async((0,), queue=queue)
    retry_after = err.value.retry_after
    assert retry_after is not None and backlog.RETRY_AFTER_BOUNDS[0] <= retry_after < 1.0
    assert "the queue drains ~" in str(err.value)


def test_the_bound_clears_as_a_worker_drains(redis_client, queue, start_worker) -> None:
    from .apps import backpressure as bp

    bp.double.map_items(range(40), queue=queue, max_backlog=None)
    with pytest.raises(Backpressure):
        bp.double.apply_async((1,), queue=queue)
    start_worker("tests.apps.backpressure", queues=queue)
    deadline = time.monotonic() + 30
    while True:
        try:
            result = bp.double.apply_async((21,), queue=queue)
            break
        except Backpressure as exc:
            assert time.monotonic() < deadline, exc
            time.sleep(exc.retry_after or 0.2)
    assert result.get(timeout=20) == 42


def test_retries_and_eager_calls_are_never_refused(redis_client, queue) -> None:
    app = _app(REDIS_URL)
    task = _task(app, max_backlog=1)
    task.apply_async((1,), queue=queue)
    task.apply_async((1,), queue=queue, retries=1)  # Celery's retry passes the retry count
    assert redis_client.llen(queue) == 2
    app.conf.task_always_eager = True
    assert task.delay(4).get() == 8


def test_reads_the_queue_at_most_twice_a_second(redis_client, queue) -> None:
    app = _app(REDIS_URL)
    task = _task(app, max_backlog=10_000)
    redis_client.config_resetstat()
    started = time.monotonic()
    for i in range(300):
        task.apply_async((i,), queue=queue)
    elapsed = time.monotonic() - started
    llen = redis_client.info("commandstats").get("cmdstat_llen", {}).get("calls", 0)
    with app.connection_for_write() as conn:
        steps = len(conn.default_channel.priority_steps)
    assert 0 < llen <= steps * (1 + elapsed / backlog.REFRESH_S + 1)


@pytest.mark.parametrize("value", [0, -3, 2.5, "100", True])
def test_a_bad_bound_is_refused_at_definition(value) -> None:
    with pytest.raises(BatchedTaskOptionError, match=r"bp.double: max_backlog must be None \(no "
                       r"bound\) or an int >= 1 \(messages waiting in the task's queue\), got"):
        _task(_app(REDIS_URL), max_backlog=value).name  # the app binds its tasks here


def test_a_broker_the_gauge_cant_read_doesnt_block_sends(caplog) -> None:
    """The bound fails open: nothing to read from means no refusal (Celery's own publish
    retries then decide), with a WARNING that says so, and no new attempt for a while."""
    from .servers import free_port

    gauge = backlog.BacklogGauge(_app(f"redis://127.0.0.1:{free_port()}/0"))
    with caplog.at_level("WARNING", logger="celery_batched.client.backlog"):
        for _ in range(3):
            gauge.admit("bp.double", "q", 1, max_backlog=1)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1, warnings
    assert "can't read the length of queue 'q'" in warnings[0]
    assert "sending without its max_backlog check" in warnings[0]
