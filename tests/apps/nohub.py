"""A batched task on kombu's filesystem transport: no event loop (Celery's ``synloop``).

The broker folders live under ``TEST_FS_DIR``; results go to the test Redis.
"""

from __future__ import annotations

import os
import time

from example_project import fs_transport  # noqa: F401  (registers filesystem-atomic://)

from celery_batched import BatchedTask

from ._common import BACKEND, make_app

_dir = os.environ.get("TEST_FS_DIR", "/tmp/celery-batched-nohub")
for _sub in ("queue", "processed", "control"):
    os.makedirs(os.path.join(_dir, _sub), exist_ok=True)

app = make_app("nohub")
app.conf.update(
    broker_url="filesystem-atomic://",
    result_backend=BACKEND,
    broker_transport_options={
        "data_folder_in": os.path.join(_dir, "queue"),
        "data_folder_out": os.path.join(_dir, "queue"),
        "processed_folder": os.path.join(_dir, "processed"),
        "control_folder": os.path.join(_dir, "control"),
        "polling_interval": 0.01,
    },
)


@app.task(base=BatchedTask, max_batch_size=2, wait_ms=50)
def slow_double(xs: list[int]) -> list[int]:
    """Slow enough that the next batch waits for the only pool process."""
    time.sleep(0.1)
    return [x * 2 for x in xs]
