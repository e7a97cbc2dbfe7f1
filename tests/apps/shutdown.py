"""A batched task for the warm-shutdown tests. Broker from TEST_BROKER_URL (Redis or AMQP).

Each batch says in Redis that it started, then runs until the test lets it finish (the key
``release``), so a test can stop the worker while a batch is running and let it end afterwards.
"""

from __future__ import annotations

import os
import time

from celery_batched import BatchedTask

from ._common import make_app, record_runs, redis_client

app = make_app("shutdown", worker_cancel_long_running_tasks_on_connection_loss=False)
if os.environ.get("TEST_FS_DIR"):  # kombu's filesystem transport: no event loop (synloop)
    from example_project import fs_transport  # noqa: F401  (registers filesystem-atomic://)

    _dir = os.environ["TEST_FS_DIR"]
    for _sub in ("queue", "processed", "control"):
        os.makedirs(os.path.join(_dir, _sub), exist_ok=True)
    app.conf.update(broker_url="filesystem-atomic://", broker_transport_options={
        "data_folder_in": os.path.join(_dir, "queue"),
        "data_folder_out": os.path.join(_dir, "queue"),
        "processed_folder": os.path.join(_dir, "processed"),
        "control_folder": os.path.join(_dir, "control"),
        "polling_interval": 0.01,
    })

_redis = redis_client()


@app.task(base=BatchedTask, max_batch_size=16,
          wait_ms=int(os.environ.get("TEST_WAIT_MS", "100")))
def paced(xs: list[int]) -> list[int]:
    _redis.rpush("started", len(xs))
    deadline = time.monotonic() + 20
    while not _redis.exists("release") and time.monotonic() < deadline:
        time.sleep(0.02)
    record_runs(_redis, xs)
    return [x * 3 for x in xs]
