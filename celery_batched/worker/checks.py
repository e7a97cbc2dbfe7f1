"""Checks a batching worker runs once at start: refuse configurations that lose or strand items.

Each check either passes, logs a warning (a setting that is ignored), or raises
:class:`~celery_batched.errors.WorkerConfigurationError` with what to install or change; the
worker then exits ("Unrecoverable error") before it takes a single message.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from kombu.exceptions import EncodeError, SerializerNotInstalled
from kombu.serialization import dumps

from ..errors import WorkerConfigurationError
from ..protocol import BatchedTaskLike

logger = logging.getLogger(__name__)

#: Redis's default ``visibility_timeout`` (kombu), in seconds.
DEFAULT_VISIBILITY_TIMEOUT_S = 3600


def batched_tasks(app: Celery) -> list[BatchedTaskLike]:
    return [t for t in app.tasks.values() if getattr(t, "_batch_spec", None) is not None]


def check_worker(app: Celery, transport_driver: str, slots: int = 1) -> None:
    """Run every check; raise the first hard failure. ``slots``: pool processes (the most,
    with ``--autoscale``)."""
    tasks = batched_tasks(app)
    if not tasks:
        return
    if transport_driver == "redis":
        check_visibility_timeout(app, tasks, slots)
    for task in tasks:
        if task.rate_limit:
            logger.warning(
                "celery_batched: %s has rate_limit=%r, which batched tasks ignore (a batch is "
                "the unit of work); bound its throughput with max_batch_size and the number of "
                "pool processes instead", task.name, task.rate_limit)


def check_result_serializer(app: Celery) -> None:
    """The result serializer must be able to encode a result at all.

    kombu registers a missing library's serializer either with an encoder that raises
    (msgpack) or with none at all (yaml: Celery then fails building its result backend with a
    bare ``KeyError``), so this runs while the worker is assembled, before Celery's banner.
    """
    if not batched_tasks(app):
        return
    serializer = app.conf.result_serializer
    try:
        dumps({"status": "SUCCESS", "result": [0.5, 1, "x"]}, serializer=serializer)
    except (SerializerNotInstalled, EncodeError, KeyError) as exc:
        hint = {"msgpack": "pip install msgpack", "yaml": "pip install PyYAML"}.get(
            serializer, f"install the library behind {serializer!r}")
        raise WorkerConfigurationError(
            f"celery_batched: result_serializer={serializer!r} can't encode results here "
            f"({exc}); every batch would fail to store its results. {hint}, or set "
            f"result_serializer to 'json'.") from exc


def check_visibility_timeout(app: Celery, tasks: list[BatchedTaskLike], slots: int = 1) -> None:
    """Redis redelivers a message unacknowledged for ``visibility_timeout``: a batched item that
    can stay unacknowledged longer would run twice, or forever.

    An item is held from its delivery to the ack after its result is stored: its wait in the
    buffer, the batches queued ahead of it in the pool (batching holds up to ``slots + 2``
    batches, plus Celery's own prefetch, for ``slots`` processes), its own batch's run, and
    the result backend's retries while it is down (``retry_policy``).
    """
    options = app.conf.broker_transport_options or {}
    visibility = float(options.get("visibility_timeout", DEFAULT_VISIBILITY_TIMEOUT_S))
    store_retries_s = _retry_policy_s(getattr(app.backend, "retry_policy", None) or {})
    base = max(1, slots) * (app.conf.worker_prefetch_multiplier or 1)
    unlimited = []
    for task in tasks:
        spec = task._batch_spec
        limit = task.time_limit or app.conf.task_time_limit
        if not limit:
            unlimited.append(task.name)
            continue
        held_batches = -(-(spec.max_batch_size * (max(1, slots) + 2) + base) // spec.max_batch_size)
        rounds = -(-held_batches // max(1, slots))
        worst = spec.wait_s + rounds * float(limit) + store_retries_s
        if worst >= visibility:
            raise WorkerConfigurationError(
                f"celery_batched: {task.name}: Redis visibility_timeout is {visibility:g}s but "
                f"an item can stay unacknowledged {worst:g}s: wait_ms ({spec.wait_s * 1000:g} ms) "
                f"+ {rounds} x time_limit ({limit}s: its own batch and the {rounds - 1} queued "
                f"ahead of it for {max(1, slots)} pool process(es)) + the result backend's "
                f"retry_policy ({store_retries_s:g}s); it would be delivered again while it "
                f"runs. Raise broker_transport_options['visibility_timeout'] above {worst:g}s, "
                f"or lower time_limit.")
    if unlimited and visibility < 600:
        names = ", ".join(sorted(unlimited)[:3]) + (f" and {len(unlimited) - 3} more"
                                                     if len(unlimited) > 3 else "")
        logger.warning(
            "celery_batched: Redis visibility_timeout is %gs and %s have no time_limit; a batch "
            "running longer than that is delivered again. Set time_limit on batched tasks and "
            "keep visibility_timeout above wait_ms + time_limit.", visibility, names)


def _retry_policy_s(policy: dict[str, Any]) -> float:
    """Seconds ``kombu.utils.functional.retry_over_time`` sleeps for a whole retry policy."""
    start = float(policy.get("interval_start", 0))
    step = float(policy.get("interval_step", 1))
    top = float(policy.get("interval_max", 1))
    return sum(min(start + k * step, top) for k in range(int(policy.get("max_retries") or 0)))
