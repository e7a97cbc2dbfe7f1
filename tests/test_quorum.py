"""Batches fill on RabbitMQ quorum queues, where the prefetch count is static.

Celery detects quorum queues and sends ``basic.qos(global=False)``, which RabbitMQ applies per
consumer and only to consumers started after it: batching's share of the prefetch count must be
set once, before the task consumer starts consuming (``BatchingStep.start``), or every batch
holds Celery's initial prefetch count and waits its full ``wait_ms``.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator

import pytest
from celery import Celery

from celery_batched.client.submit import ItemResults

from .apps._common import batch_sizes
from .apps.quorum import quorum_queue
from .conftest import REDIS_URL
from .servers import RabbitVhost
from .workers import wait_for

APP = "tests.apps.quorum"
N = 400
SIZE = 16  # tests.apps.quorum.square's max_batch_size
DRAIN_S = 60.0  # full batches take ~10 s; batches of Celery's prefetch alone take minutes


@pytest.fixture
def vhost() -> Iterator[RabbitVhost]:
    vhost = RabbitVhost().create()
    yield vhost
    vhost.delete()


def _rabbitmqctl(*args: str) -> list[list[str]]:
    out = subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True,
                         text=True, timeout=60).stdout
    return [line.split("\t") for line in out.splitlines() if line.strip()]


def consumer_prefetch(vhost: RabbitVhost, queue: str) -> list[int]:
    """The prefetch count of each consumer of ``queue`` (what RabbitMQ enforces per consumer)."""
    rows = _rabbitmqctl("list_consumers", "-p", vhost.name, "queue_name", "prefetch_count")
    return [int(row[1]) for row in rows if len(row) == 2 and row[0] == queue]


def channel_prefetch(vhost: RabbitVhost) -> set[int]:
    """The last per-consumer prefetch count each of the vhost's channels sent (0: none)."""
    rows = _rabbitmqctl("list_channels", "vhost", "prefetch_count")
    return {int(row[1]) for row in rows if len(row) == 2 and row[0] == vhost.name}


@pytest.mark.parametrize("multiplier, base", [(4, 4), (0, 1)],
                         ids=["default-multiplier", "multiplier-0"])
def test_batches_fill_on_a_quorum_queue(multiplier, base, vhost, queue, redis_client,
                                        start_worker):
    client = Celery("client", broker=vhost.url(), backend=REDIS_URL)
    client.conf.update(task_serializer="json", accept_content=["json"], result_serializer="json",
                       task_queues=[quorum_queue(queue)])
    try:
        with client.producer_or_acquire() as producer:  # declares the quorum queue
            results = [client.send_task("tests.apps.quorum.square", (i,), queue=queue,
                                        producer=producer) for i in range(N)]
        env = {"TEST_BROKER_URL": vhost.url(), "TEST_QUEUE": queue,
               "TEST_PREFETCH_MULTIPLIER": str(multiplier)}
        worker = start_worker(APP, queues=queue, env=env)
        # -c 1: Celery's base (4 x 1, or 1 per process for "unlimited") + 16 x (1 process + 2).
        share = SIZE * (1 + 2)
        static = base + share
        unacked = []
        deadline = time.monotonic() + DRAIN_S
        while redis_client.hlen("runs") < N and time.monotonic() < deadline:
            unacked.append(vhost.unacked(queue))  # ~1 s per call
        consumers, channels = consumer_prefetch(vhost, queue), channel_prefetch(vhost) - {0}
        sizes = batch_sizes(redis_client)
        done = redis_client.hlen("runs")
        mean = sum(sizes) / max(1, len(sizes))
        summary = (f"{done} of {N} drained, {len(sizes)} batches, mean {mean:.1f}, "
                   f"sizes {sizes[:30]}, max unacked {max(unacked, default=0)} "
                   f"(static {static}, {len(unacked)} samples), consumer prefetch {consumers}, "
                   f"channels' last basic.qos {sorted(channels)}")
        print(summary)
        assert mean >= 0.75 * SIZE, f"batches didn't fill: {summary}"
        assert done == N, f"drain too slow: {summary}"
        assert all(s == SIZE for s in sizes[:-1]), f"a batch before the last wasn't full: {summary}"
        assert len(unacked) >= 3, f"too few unacked samples: {summary}"
        assert 0 < max(unacked) <= static, f"unacked over the static prefetch count: {summary}"
        assert consumers == [static], f"the consumer didn't get the static count: {summary}"
        assert channels == {static}, f"basic.qos sent again after consuming began: {summary}"
        assert ItemResults(results, client).get(timeout=30) == [i * i for i in range(N)]
        log = worker.log()
        assert (f"celery_batched: queue '{queue}' is a quorum queue: RabbitMQ applies prefetch "
                f"per consumer, set once before consuming: {static} (Celery's {base} + "
                f"batching's {share})") in log, log
        # A larger max_batch_size at runtime can't raise a count RabbitMQ applies per consumer.
        reply = client.control.broadcast(
            "configure_batching", arguments={"task_name": "tests.apps.quorum.square",
                                             "settings": ["max_batch_size=32"]},
            destination=[worker.hostname], reply=True, limit=1, timeout=10)
        assert reply and "ok" in reply[0][worker.hostname], reply
        wait_for(lambda: "WARNING/MainProcess] celery_batched: tests.apps.quorum.square "
                         "max_batch_size=32 can't raise the prefetch count" in worker.log(), 5,
                 what="the warning that a static prefetch count can't grow")
    finally:
        client.close()
