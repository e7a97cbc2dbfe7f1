"""Warm shutdown (SIGTERM) while a batch runs, on every pool and both brokers: the running batch
finishes, its results are stored AND acknowledged before the broker connection closes, the
buffered items go back to the broker, and nothing runs twice.

``-P threads`` used to run the running batch again: its pool callback was still queued when the
event loop closed, and the writer's completion (the acks) came after the loop had closed.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from celery import Celery

from .apps._common import batch_sizes
from .conftest import REDIS_URL
from .servers import RabbitVhost
from .workers import wait_for

APP = "tests.apps.shutdown"
TASK = "tests.apps.shutdown.paced"
SIZE = 16  # paced's max_batch_size
EXTRA = 5  # items left in the buffer when the worker stops


@pytest.fixture(scope="module")
def vhost() -> Iterator[RabbitVhost]:
    """One RabbitMQ vhost for the module (every test has a queue of its own)."""
    vhost = RabbitVhost().create()
    yield vhost
    vhost.delete()


@pytest.fixture
def broker(request, redis_client, tmp_path):  # noqa: ANN001, ANN201
    """Redis and RabbitMQ (an event loop), kombu's filesystem transport (none: synloop)."""
    folder = tmp_path / "fs"
    if request.param == "filesystem":
        from example_project import fs_transport  # noqa: F401  (registers filesystem-atomic://)
        url, env = "filesystem-atomic://", {"TEST_FS_DIR": str(folder)}
    else:
        url = REDIS_URL if request.param == "redis" else request.getfixturevalue("vhost").url()
        env = {"TEST_BROKER_URL": url}
    client = Celery("client", broker=url, backend=REDIS_URL)
    client.conf.update(task_serializer="json", accept_content=["json"], result_serializer="json")
    if request.param == "filesystem":
        client.conf.broker_transport_options = {
            "data_folder_in": str(folder / "queue"), "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"),
            "control_folder": str(folder / "control")}
        for sub in ("queue", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
    yield SimpleNamespace(name=request.param, url=url, app=client, env=env, folder=folder)
    client.close()


def depth(broker, redis_client, queue: str) -> int:  # noqa: ANN001
    """Messages waiting in the queue (not delivered to a worker)."""
    if broker.name == "filesystem":
        return len(list((broker.folder / "queue").glob(f"*.{queue}.msg")))
    if broker.name == "redis":  # the queue's list, and its priority lists
        return sum(redis_client.llen(k) for k in redis_client.keys(f"{queue}*")
                   if redis_client.type(k) == b"list")
    with broker.app.connection_for_write() as conn:
        return int(conn.default_channel.queue_declare(queue, passive=True).message_count)


POOLS = [("threads", 1), ("threads", 4), ("prefork", 1), ("solo", 1)]
#: Without an event loop the pool's callbacks come from other threads only with these pools.
CASES = [(b, pool, c) for b in ("redis", "rabbitmq") for pool, c in POOLS] + \
    [("filesystem", "threads", 1), ("filesystem", "prefork", 1)]


@pytest.mark.parametrize("broker,pool,concurrency", [
    pytest.param(b, pool, c, id=f"{b}-{pool}" + (f"-c{c}" if pool != "solo" else ""))
    for b, pool, c in CASES], indirect=["broker"])
def test_warm_shutdown_mid_batch_runs_nothing_twice(pool, concurrency, broker, queue,  # noqa: ANN001
                                                    redis_client, start_worker) -> None:
    running = SIZE * concurrency  # one full batch per pool slot, running when the worker stops
    env = {**broker.env, "TEST_WAIT_MS": "20000"}  # the extra items stay in the buffer
    worker = start_worker(APP, queues=queue, pool=pool, concurrency=concurrency, env=env)
    with broker.app.producer_or_acquire() as producer:
        results = [broker.app.send_task(TASK, (i,), queue=queue, producer=producer)
                   for i in range(running + EXTRA)]
    wait_for(lambda: redis_client.llen("started") == concurrency, 20, what="the batches started")
    if pool != "solo":  # solo runs the batch in the consumer: nothing is fetched meanwhile
        wait_for(lambda: depth(broker, redis_client, queue) == 0, 10,
                 what="every message in the worker")
    worker.proc.send_signal(signal.SIGTERM)
    if pool == "solo":
        wait_for(lambda: "Warm shutdown" in worker.log(), 10, what="the warm shutdown")
    else:  # the consumer has stopped: the loop is over, the pool waits for the batch
        wait_for(lambda: f"handed {EXTRA} buffered message(s) back" in worker.log(), 10,
                 what="the buffered items handed back")
    redis_client.set("release", 1)  # now let the running batch finish
    assert worker.proc.wait(30) == 0
    assert batch_sizes(redis_client) == [SIZE] * concurrency
    left = depth(broker, redis_client, queue)  # what goes to the next worker

    start_worker(APP, queues=queue, pool=pool, concurrency=concurrency, env=broker.env)
    assert [r.get(timeout=30) for r in results] == [3 * i for i in range(running + EXTRA)]
    counts = {int(k): int(v) for k, v in redis_client.hgetall("runs").items()}
    assert {i: c for i, c in counts.items() if c != 1} == {}, \
        f"ran twice (the running batch was not acknowledged; {left} message(s) were left)"
    assert sorted(counts) == list(range(running + EXTRA))
    assert left == EXTRA  # the running batch was acknowledged before the connection closed
    assert sum(batch_sizes(redis_client)) == running + EXTRA
