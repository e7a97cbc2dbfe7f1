"""A batched task that reports, per item, the pool process and the device it was pinned to."""

from __future__ import annotations

import os
import time

import celery_batched
from celery_batched import BatchedTask

from ._common import make_app

app = make_app("devices")
celery_batched.install(app)  # the worker options, before `celery worker` reads its command line


@app.task(base=BatchedTask, max_batch_size=2, wait_ms=50)
def where(xs: list[int]) -> list[str]:
    time.sleep(0.3)  # long enough that the next batch goes to the other process
    return [f"{os.getpid()}:{os.environ.get('CUDA_VISIBLE_DEVICES')}" for _ in xs]
