"""A batched task on a RabbitMQ quorum queue (TEST_QUEUE), where Celery turns global QoS off and
the prefetch count is static. Broker from TEST_BROKER_URL (a RabbitMQ vhost)."""

from __future__ import annotations

import os
import time

from kombu import Queue

from celery_batched import BatchedTask

from ._common import make_app, record_runs, redis_client

QUEUE = os.environ.get("TEST_QUEUE", "quorum")


def quorum_queue(name: str) -> Queue:
    """The queue as both the sender and the worker declare it."""
    return Queue(name, routing_key=name, queue_arguments={"x-queue-type": "quorum"})


app = make_app("quorum", task_queues=[quorum_queue(QUEUE)])
if os.environ.get("TEST_PREFETCH_MULTIPLIER"):
    app.conf.worker_prefetch_multiplier = int(os.environ["TEST_PREFETCH_MULTIPLIER"])

_redis = redis_client()


@app.task(base=BatchedTask, max_batch_size=16, wait_ms=500)
def square(xs: list[int]) -> list[int]:
    """Takes a while per batch, so a drain lasts long enough to sample unacked messages."""
    time.sleep(0.25)
    record_runs(_redis, xs)
    return [x * x for x in xs]
