"""Checks a batching worker runs once at start: refuse configurations that lose or strand items.

Each check either passes, logs a warning (a setting that is ignored), or raises
:class:`~celery_batched.errors.WorkerConfigurationError` with what to install or change; the
worker then exits ("Unrecoverable error") before it takes a single message.
"""

from __future__ import annotations

import logging
from typing import Any

from kombu.exceptions import EncodeError, SerializerNotInstalled
from kombu.serialization import dumps

from .errors import WorkerConfigurationError

logger = logging.getLogger(__name__)

#: Redis's default ``visibility_timeout`` (kombu), in seconds.
DEFAULT_VISIBILITY_TIMEOUT_S = 3600


def batched_tasks(app: Any) -> list[Any]:
    return [t for t in app.tasks.values() if getattr(t, "_batch_spec", None) is not None]


def check_worker(app: Any, transport_driver: str) -> None:
    """Run every check; raise the first hard failure."""
    tasks = batched_tasks(app)
    if not tasks:
        return
    if transport_driver == "redis":
        check_visibility_timeout(app, tasks)
    for task in tasks:
        if task.rate_limit:
            logger.warning(
                "celery_batched: %s has rate_limit=%r, which batched tasks ignore (a batch is "
                "the unit of work); bound its throughput with max_batch_size and the number of "
                "pool processes instead", task.name, task.rate_limit)


def check_result_serializer(app: Any) -> None:
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


def check_visibility_timeout(app: Any, tasks: list[Any]) -> None:
    """Redis redelivers a message unacknowledged for ``visibility_timeout``: a batch that can
    outlast it (buffered wait + time limit) would run its items twice, or forever."""
    options = app.conf.broker_transport_options or {}
    visibility = float(options.get("visibility_timeout", DEFAULT_VISIBILITY_TIMEOUT_S))
    unlimited = []
    for task in tasks:
        wait_s = task._batch_spec.wait_s
        limit = task.time_limit or app.conf.task_time_limit
        if limit and wait_s + float(limit) >= visibility:
            raise WorkerConfigurationError(
                f"celery_batched: {task.name}: Redis visibility_timeout is {visibility:g}s but a "
                f"batch can take wait_ms ({wait_s * 1000:g} ms) + time_limit ({limit}s); its items "
                f"would be delivered again while they run. Raise broker_transport_options"
                f"['visibility_timeout'] above {wait_s + float(limit):g}s or lower time_limit.")
        if not limit:
            unlimited.append(task.name)
    if unlimited and visibility < 600:
        names = ", ".join(sorted(unlimited)[:3]) + (f" and {len(unlimited) - 3} more"
                                                     if len(unlimited) > 3 else "")
        logger.warning(
            "celery_batched: Redis visibility_timeout is %gs and %s have no time_limit; a batch "
            "running longer than that is delivered again. Set time_limit on batched tasks and "
            "keep visibility_timeout above wait_ms + time_limit.", visibility, names)
