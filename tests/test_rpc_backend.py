"""Bulk submit with Celery's ``rpc://`` result backend: results come back as messages on the
caller's reply queue, so every message must carry ``reply_to`` as ``.delay()``'s do.

Run on a RabbitMQ vhost of the test's own (kombu's producer path) and on Redis (the spliced
pipeline path). Celery itself runs ``rpc://`` on a Redis broker too (kombu's virtual transport
delivers to the reply queue through the default exchange): ``.delay().get()`` is checked on both
first, as the control.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from celery import Celery

from celery_batched import BatchedTask
from celery_batched._internals.kombu_redis import RedisBulkPublisher

from .conftest import REDIS_URL
from .servers import RabbitVhost

APP = "tests.apps.rpc_results"
T = "tests.apps.rpc_results."


def _triple(xs: list[int]) -> list[int]:
    return [x * 3 for x in xs]


def _pair_sum(xs: list[int], ys: list[int]) -> list[int]:
    return [x + y for x, y in zip(xs, ys)]


@pytest.fixture(params=["rabbitmq", "redis"])
def rpc_client(request, queue, redis_client) -> Iterator[SimpleNamespace]:
    """A client app on this broker with ``backend="rpc://"`` and the worker's two tasks."""
    vhost = RabbitVhost().create() if request.param == "rabbitmq" else None
    url = vhost.url() if vhost is not None else REDIS_URL
    client = Celery("rpc-client", broker=url, backend="rpc://")
    client.conf.update(task_serializer="json", accept_content=["json"], result_serializer="json")
    # Not shared: apps made later in this process (other tests') don't get them.
    options = {"base": BatchedTask, "max_batch_size": 16, "wait_ms": 50, "shared": False}
    triple = client.task(name=T + "triple", **options)(_triple)
    pair_sum = client.task(name=T + "pair_sum", **options)(_pair_sum)
    try:
        yield SimpleNamespace(name=request.param, app=client, triple=triple, pair_sum=pair_sum,
                              env={"TEST_BROKER_URL": url})
    finally:
        client.close()
        if vhost is not None:
            vhost.delete()


def test_map_items_results_arrive_over_rpc(rpc_client, queue, start_worker, monkeypatch):
    spliced = []
    for_channel = RedisBulkPublisher.for_channel.__func__

    def spy(cls, channel, queue_name):  # which publishing path the bulk send took
        publisher = for_channel(cls, channel, queue_name)
        spliced.append(publisher is not None)
        return publisher

    monkeypatch.setattr(RedisBulkPublisher, "for_channel", classmethod(spy))
    start_worker(APP, queues=queue, env=rpc_client.env)
    # The control: Celery's own path gets its result over rpc:// on this broker.
    assert rpc_client.triple.apply_async((5,), queue=queue).get(timeout=20) == 15

    results = rpc_client.triple.map_items(range(50), queue=queue)
    assert spliced == [rpc_client.name == "redis"]
    assert results.get(timeout=30) == [3 * i for i in range(50)]
    assert all(r.state == "SUCCESS" for r in results)
    assert [r.get(timeout=5) for r in results[:5]] == [0, 3, 6, 9, 12]  # already collected

    pairs = rpc_client.pair_sum.starmap_items([(i, 100) for i in range(30)]
                                              + [{"xs": 7, "ys": 8}], queue=queue)
    assert pairs.get(timeout=30) == [i + 100 for i in range(30)] + [15]
    # One item's own AsyncResult, collected by itself.
    one = rpc_client.triple.map_items([1000], queue=queue)
    assert one[0].get(timeout=20) == 3000
