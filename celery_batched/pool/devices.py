"""One GPU per pool process: ``CUDA_VISIBLE_DEVICES`` set in each prefork child as it starts.

The worker option ``--batching-pool-devices 0,1`` (per node with ``celery multi``:
``--batching-pool-devices:gpu1=1``), else the app setting ``batching_pool_devices`` (a list, or a
comma-separated string), else the environment variable ``CELERY_BATCHED_POOL_DEVICES``, names a
device per pool process: child
*i* sees only ``devices[i % len(devices)]``. ``-c 2`` with ``"0,1"`` runs one process per GPU of
a two-GPU host under one consumer; ``-c 2`` with ``"0,0"`` runs two processes on one GPU (one
runs its batch while the other decodes and hands back the last). The child's index is
billiard's (a replaced child -- ``--max-tasks-per-child``, a crash -- takes its predecessor's
index, so its device too). Set before ``setup()`` runs, so the model loads on that device;
torch must not have initialized CUDA in the worker's main process (it can't be forked anyway).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

from billiard.process import current_process
from celery import Celery, signals

from ..errors import WorkerConfigurationError

logger = logging.getLogger(__name__)

ENV = "CELERY_BATCHED_POOL_DEVICES"
SETTING = "batching_pool_devices"


OPTION = "--batching-pool-devices"


def configured(app: Celery, option: str | None = None) -> list[str]:
    """The devices named for this worker's pool processes (empty: none pinned)."""
    raw, source = option, OPTION
    if raw is None:
        raw, source = app.conf.get(SETTING), SETTING
    if raw is None:
        raw, source = os.environ.get(ENV), ENV
    if raw is None or raw == "":
        return []
    if isinstance(raw, str):
        devices = [d.strip() for d in raw.split(",")]
    elif isinstance(raw, Sequence):
        devices = [str(d).strip() for d in raw]
    else:
        raise WorkerConfigurationError(
            f"{source}={raw!r}: give a list of device ids, or a comma-separated string, "
            f"e.g. '0,1'")
    if not devices or any(not d for d in devices):
        raise WorkerConfigurationError(
            f"{source}={raw!r} names an empty device id; give e.g. '0,1' (one per pool process, "
            f"in turn)")
    return devices


def check_pool(app: Celery, pool: Any, option: str | None = None) -> list[str]:
    """At worker start: the devices, if this worker's pool can honour them (prefork only)."""
    from celery.concurrency.prefork import TaskPool as PreforkPool

    devices = configured(app, option)
    if devices and not isinstance(pool, PreforkPool):
        raise WorkerConfigurationError(
            f"{OPTION} / {SETTING} / {ENV} pins each prefork pool process to a device, but this worker's "
            f"pool is {type(pool).__module__}: its batches all run in one process. Run it with "
            f"-P prefork, or run one worker per device with CUDA_VISIBLE_DEVICES set for each")
    return devices


def pin(devices: list[str]) -> str | None:
    """In a pool child: make only its device visible; the device, or None outside a child."""
    index = getattr(current_process(), "index", None)
    if index is None or not devices:
        return None
    device = devices[index % len(devices)]
    os.environ["CUDA_VISIBLE_DEVICES"] = device
    logger.info("celery_batched: pool process %d (pid %d) uses CUDA_VISIBLE_DEVICES=%s",
                index, os.getpid(), device)
    return device


def pin_children(app: Celery, pool: Any, option: str | None = None) -> Callable[..., None] | None:
    """Have each pool child pin its device as it starts (``worker_process_init``); the receiver
    (to disconnect at shutdown), or None when no devices are named."""
    devices = check_pool(app, pool, option)
    if not devices:
        return None

    def on_child_start(**_: Any) -> None:
        pin(devices)

    signals.worker_process_init.connect(on_child_start, weak=False)
    logger.info("celery_batched: pool processes pinned to CUDA_VISIBLE_DEVICES %s in turn",
                ",".join(devices))
    return on_child_start
