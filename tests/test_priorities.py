"""``urgent_priority``: urgent items batch apart, with their own wait, and go first to a free
pool process, never starving the rest. On real workers (Redis: priority 0 is the most urgent;
RabbitMQ: the highest), then the buffer's rules with each other policy on a hand-run clock."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery

from celery_batched import FlushReason, batching_stats
from celery_batched.worker.urgency import MAX_URGENT_IN_A_ROW, urgency
from celery_batched.worker.latency import LatencyModel

from .apps import policies
from .conftest import REDIS_URL
from .servers import RabbitVhost
from .test_preferred_sizes import It, _buffer, _spec
from .workers import wait_for

APP = "tests.apps.policies"


def calls(redis_client) -> list[list[int]]:
    return [json.loads(x)["xs"] for x in redis_client.lrange("exec:shared_gpu", 0, -1)]


def test_urgent_items_overtake_waiting_bulk_batches(redis_client, queue, start_worker):
    worker = start_worker(APP, queues=queue)
    task = policies.shared_gpu
    bulk = task.map_items(range(10), queue=queue, priority=9)  # two full batches, and 8, 9
    wait_for(lambda: calls(redis_client), 10, what="the first bulk batch running")
    # While it runs (0.3 s) the second bulk batch waits in the buffer, not in the pool's queue:
    # the urgent items, sent after it, run before it, with the oldest waiting bulk items in
    # their room; the rest of that batch is made up from the next (8 and 9, still filling).
    urgent = [task.apply_async((100 + i,), queue=queue, priority=0) for i in range(2)]
    assert [r.get(timeout=30) for r in urgent] == [100, 101]
    assert bulk.get(timeout=30) == list(range(10))
    assert calls(redis_client) == [[0, 1, 2, 3], [100, 101, 4, 5], [6, 7, 8, 9]]
    got = batching_stats(policies.app, timeout=2.0, destination=[worker.hostname])
    settings = got[worker.hostname][task.name]["settings"]
    assert settings["urgent_priority"] == 0 and settings["urgent_wait_ms"] == 0.0, settings


@pytest.fixture
def vhost() -> Iterator[RabbitVhost]:
    vhost = RabbitVhost().create()
    yield vhost
    vhost.delete()


def test_on_rabbitmq_higher_priorities_are_the_urgent_ones(redis_client, vhost, queue,
                                                          start_worker):
    client = Celery("client", broker=vhost.url(), backend=REDIS_URL)
    client.conf.update(task_serializer="json", accept_content=["json"],
                       result_serializer="json", task_queue_max_priority=10)
    env = {"TEST_BROKER_URL": vhost.url(), "TEST_QUEUE_MAX_PRIORITY": "10"}
    start_worker(APP, queues=queue, env=env)
    name = policies.shared_gpu_amqp.name
    with client.producer_or_acquire() as producer:
        bulk = [client.send_task(name, (i,), queue=queue, priority=1, producer=producer)
                for i in range(8)]
    runs = lambda: [json.loads(x)["xs"]  # noqa: E731
                    for x in redis_client.lrange("exec:shared_gpu_amqp", 0, -1)]
    wait_for(runs, 10, what="the first bulk batch running")
    with client.producer_or_acquire() as producer:
        urgent = [client.send_task(name, (100 + i,), queue=queue, priority=9,
                                   producer=producer) for i in range(2)]
        # Priority 4 is below urgent_priority=5: an ordinary item, however it is sent.
        late = client.send_task(name, (200,), queue=queue, priority=4, producer=producer)
    assert [r.get(timeout=30) for r in urgent + bulk + [late]] == \
        [100, 101, *range(8), 200]
    assert runs() == [[0, 1, 2, 3], [100, 101, 4, 5], [6, 7, 200]]


def test_without_a_priority_on_redis_an_item_counts_as_priority_0():
    """kombu's Redis transport gives a message without a priority 0, its most urgent."""
    on_redis, on_rabbitmq = urgency(0, high_first=False), urgency(5, high_first=True)
    assert on_redis is not None and on_rabbitmq is not None
    assert [on_redis(It(0, priority=p)) for p in (0, 3, 9, None)] == [True, False, False, False]
    assert [on_rabbitmq(It(0, priority=p)) for p in (9, 5, 4, None)] == [True, True, False, False]
    assert urgency(None, high_first=True) is None


# -- The buffer's rules with the other policies ----------------------------------------------

def _urgent_buffer(busy: list[bool], one_process: bool = False, **options: Any):
    spec = _spec(options.pop("preferred", None), max_batch_size=options.pop("max_batch_size", 2),
                 urgent_priority=9, urgent_wait_ms=options.pop("urgent_wait_ms", 1), **options)
    return _buffer(spec, busy=busy, one_process=one_process)


def test_urgent_batches_go_first_but_never_more_than_a_few_in_a_row():
    busy = [True]
    buffer, clock, flushed = _urgent_buffer(busy, one_process=True)
    for x in range(4):  # two full bulk batches, held: every process is busy
        buffer.put(It(x, priority=1))
    for x in range(10, 20):  # five full urgent batches
        buffer.put(It(x, priority=9))
    assert flushed == [] and len(buffer) == 14
    order = []
    for _ in range(7):  # one process frees at a time
        busy[0] = False
        buffer.flush_if_due()
        order.append(flushed[-1][0])
        flushed.clear()
    assert MAX_URGENT_IN_A_ROW == 3
    assert order == [[10, 11], [12, 13], [14, 15], [0, 1], [16, 17], [18, 19], [2, 3]]


def test_an_urgent_batch_that_goes_first_takes_other_items_of_its_key_along():
    busy = [True]
    buffer, clock, flushed = _urgent_buffer(busy, one_process=True, max_batch_size=4,
                                            batch_key=lambda x: x % 2)
    for x in (0, 2, 4, 6, 8, 10, 1):  # key 0: a full batch (held), then 8 and 10 filling
        buffer.put(It(x, priority=1), x % 2)
    buffer.put(It(20, priority=9), 0)
    buffer.put(It(21, priority=9), 1)
    clock.fire()  # every process busy: the urgent batches are due, and wait
    assert flushed == []
    order = []
    for _ in range(3):  # one process frees at a time
        busy[0] = False
        buffer.flush_if_due()
        order.append(flushed.pop())
    # Each urgent batch fills its room with its own key's oldest waiting items, never another's;
    # the batch it took them from is made up from the batch being filled.
    assert order == [([20, 0, 2, 4], FlushReason.URGENT), ([21, 1], FlushReason.URGENT),
                     ([6, 8, 10], FlushReason.SIZE)]
    assert len(buffer) == 0


def test_with_a_cost_bound_an_urgent_batch_is_not_topped_up():
    busy = [True]
    buffer, clock, flushed = _urgent_buffer(busy, one_process=True, max_batch_size=4,
                                            batch_cost=lambda x: 1, max_batch_cost=100)
    for x, p in ((0, 1), (1, 1), (9, 9)):
        buffer.put(It(x, priority=p), None, 1.0)
    clock.fire()
    busy[0] = False
    buffer.flush_if_due()
    assert flushed == [([9], FlushReason.URGENT)] and len(buffer) == 2


def test_urgent_items_batch_apart_with_their_own_wait_and_keys_still_apply():
    busy = [False]
    buffer, clock, flushed = _urgent_buffer(busy, max_batch_size=3, batch_key=lambda x: x % 2,
                                            wait_ms=50, urgent_wait_ms=0)
    for x, p in ((0, 1), (2, 9), (4, 1), (1, 9), (3, 9), (6, 9)):
        buffer.put(It(x, priority=p), x % 2)
    assert flushed == []
    timers = sorted(round(e[0], 3) for e in clock.entries)
    assert timers == [0.0, 0.0, 0.05]  # urgent even, urgent odd: urgent_wait_ms; other: wait_ms
    clock.fire()
    assert sorted(items for items, _ in flushed) == [[0, 4], [1, 3], [2, 6]]


def test_with_a_latency_target_urgent_batches_keep_their_fixed_wait():
    latency = LatencyModel(target_ms=500, max_batch_size=8)
    spec = _spec(None, max_batch_size=8, max_latency_ms=500, urgent_priority=9,
                 urgent_wait_ms=7)
    buffer, clock, flushed = _buffer(spec, latency=latency)
    buffer.put(It(1, priority=9))
    assert flushed == [] and [round(e[0], 3) for e in clock.entries] == [0.007]
    buffer.put(It(2, priority=0))  # no arrival rate known yet: the target flushes it at once
    assert flushed == [([2], FlushReason.LATENCY)]
    clock.fire()
    assert flushed[-1] == ([1], FlushReason.WAIT)


def test_each_lane_has_its_own_cost_and_preferred_sizes():
    busy = [False]
    buffer, clock, flushed = _urgent_buffer(busy, max_batch_size=4, preferred=(2, 4),
                                            batch_cost=lambda x: x, max_batch_cost=10)
    for x, p in ((6, 1), (6, 9)):  # 6 + 6 would exceed 10, but they are in different lanes
        buffer.put(It(x, priority=p), None, float(x))
    assert flushed == []
    for x in (1, 1):
        buffer.put(It(x, priority=9), None, 1.0)
    clock.fire()  # urgent: 3 items due, cut at 2; other: 1 item, whole
    assert sorted(flushed) == [([6], FlushReason.WAIT), ([6, 1], FlushReason.PREFERRED)]


def test_configure_batching_changes_urgent_wait_ms_only_with_urgent_priority():
    from celery_batched import BatchedTaskOptionError

    busy = [False]
    buffer, clock, flushed = _urgent_buffer(busy)
    buffer.reconfigure(buffer.spec.reconfigured({"urgent_wait_ms": "40"}))
    buffer.put(It(1, priority=9))
    assert [round(e[0], 3) for e in clock.entries] == [0.04]
    # Batches waiting for a process are cut to a lower max_batch_size.
    busy[0] = True
    for x in range(2, 6):
        buffer.put(It(x, priority=1))
    buffer.reconfigure(buffer.spec.reconfigured({"max_batch_size": 1}))
    busy[0] = False
    buffer.flush_if_due()
    assert [items for items, _ in flushed if items != [1]] == [[2], [3], [4], [5]]
    with pytest.raises(BatchedTaskOptionError, match="urgent_wait_ms needs urgent_priority"):
        _spec().reconfigured({"urgent_wait_ms": 5})
    with pytest.raises(BatchedTaskOptionError, match="can't change urgent_priority"):
        buffer.spec.reconfigured({"urgent_priority": 3})


def test_batches_waiting_for_a_process_go_back_to_the_broker_at_a_reconnect():
    busy = [True]
    buffer, clock, flushed = _urgent_buffer(busy)
    for x, p in ((1, 1), (2, 1), (3, 9), (4, 9), (5, 1)):
        buffer.put(It(x, priority=p))
    assert len(buffer) == 5 and flushed == []
    assert sorted(it.x for it in buffer.take_all()) == [1, 2, 3, 4, 5]
    assert len(buffer) == 0


@pytest.mark.parametrize("options, says", [
    ({"urgent_priority": -1}, "urgent_priority must be a message priority"),
    ({"urgent_priority": "high"}, "urgent_priority must be a message priority"),
    ({"urgent_priority": 9, "urgent_wait_ms": -1}, "urgent_wait_ms must be"),
])
def test_priority_options_are_checked_at_definition(options, says):
    from celery import Celery

    from celery_batched import BatchedTask, BatchedTaskOptionError

    app = Celery("definitions", set_as_current=False)

    def xs_fn(xs: list[int]) -> list[int]:
        return xs

    with pytest.raises(BatchedTaskOptionError, match=says):
        app.task(base=BatchedTask, name="bad", shared=False, **options)(xs_fn)._batch_spec
