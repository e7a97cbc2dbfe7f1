"""The Redis broker's server dies and comes back, several times, while a worker drains: the worker
survives every loss and every item ends SUCCESS.

Regression test for a worker exiting with ``Unrecoverable error: AttributeError("'NoneType' object
has no attribute 'hostname'")`` when its broker's redis-server was killed while a batch ran and a
BRPOP was waiting (kombu's Redis ``Channel.close`` raises before the channel is closed; Celery then
closes the connection again after ``collect()`` cleared its transport's client). See
``celery_batched._internals.kombu_redis.guard_close``.
"""

from __future__ import annotations

import time

from celery import Celery, states

from .conftest import REDIS_URL
from .workers import wait_for

T = "tests.apps.faults."
ROUNDS = 4  # the first loss of a worker's life never tripped it; the second one did
WAVE = 30   # a batch of 20 runs while 10 wait: unacknowledged messages AND a BRPOP in flight


def test_worker_survives_broker_server_killed_mid_drain(queue, redis_client, start_worker,
                                                        private_redis):
    broker = private_redis(True)  # AOF, fsync always: what was queued survives the kill
    env = {"TEST_BROKER_URL": broker.url(), "TEST_BACKEND_URL": REDIS_URL,
           "TEST_RECORD_URL": REDIS_URL}
    client = Celery("client", broker=broker.url(), backend=REDIS_URL)
    client.conf.update(task_serializer="json", accept_content=["json"], result_serializer="json")
    redis_client.set("delay", 0.6)  # each batch runs 0.6 s: the kill lands while one runs
    worker = start_worker("tests.apps.faults", queues=queue, env=env)
    results = []
    try:
        for round_ in range(ROUNDS):
            connected = worker.log().count("Connected to")
            with client.connection_for_write() as conn, conn.Producer() as producer:
                results += [client.send_task(T + "slow_square", (i,), queue=queue,
                                             producer=producer)
                            for i in range(round_ * WAVE, (round_ + 1) * WAVE)]
            wait_for(lambda: broker.client().hlen("unacked") > 0, 10,
                     what="the worker to take the wave")
            time.sleep(0.25)  # flushed (wait_ms=50) and running in the pool
            broker.stop()
            time.sleep(0.5)
            broker.start()
            wait_for(lambda: worker.proc.poll() is not None
                     or worker.log().count("Connected to") > connected, 30,
                     what="the worker to reconnect (or die)")
            assert worker.proc.poll() is None, f"the worker died at broker loss {round_ + 1}"
        values = [r.get(timeout=60) for r in results]
        assert values == [i * i for i in range(ROUNDS * WAVE)]
        assert all(r.state == states.SUCCESS for r in results)
        assert worker.proc.poll() is None, "the worker died"
        log = worker.log()
        assert "Unrecoverable error" not in log
        assert log.count("Connected to") >= ROUNDS + 1, "the worker did not reconnect each time"
    finally:
        client.close()
