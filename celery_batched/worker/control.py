"""Remote control of batching workers: see and steer batching without a restart.

* ``celery -A proj inspect batching_stats`` -- per task: batches, items, sizes (numeric order),
  flushes by reason, percentiles of batch size, buffer wait and execution time over the recent
  batches, the settings in force, what is buffered and held.
* ``celery -A proj inspect batching_config`` -- the settings in force, per batched task.
* ``celery -A proj inspect batch <batch_id or item id>`` -- one of the worker's recent
  batches: its items and what became of each (``observe/history.py``).
* ``celery -A proj control configure_batching proj.embed max_batch_size=128 wait_ms=10`` --
  new settings on running workers, checked as at definition; the reply names the settings in
  force, or the error. (Celery keeps one type per command name, so the inspect command that
  shows the settings and the control command that changes them have two names.)
* ``celery -A proj control rate_limit`` -- Celery's own, refusing batched tasks (a batch is the
  unit of work) instead of answering "set successfully" and ignoring it.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Any

from celery.worker.control import Panel, control_command, inspect_command

from ..errors import BatchedTaskDefinitionError, BatchedTaskOptionError
from ..spec import RECONFIGURABLE


def _batching(state: Any) -> Any:
    return getattr(state.consumer, "batching", None)


@inspect_command()
def batching_stats(state: Any, **kwargs: Any) -> dict[str, Any]:
    """Batches run per batched task: sizes, flush reasons, percentiles, settings, buffered.

    ``celery_batched.batching_stats(app)`` or ``celery -A proj inspect batching_stats``.
    """
    batching = _batching(state)
    return batching.stats() if batching is not None else {}


@inspect_command()
def batching_config(state: Any, **kwargs: Any) -> dict[str, Any]:
    """The batching settings in force, per batched task of this worker."""
    return {name: task._batch_spec.settings() for name, task in sorted(state.app.tasks.items())
            if getattr(task, "_batch_spec", None) is not None}


@inspect_command(
    args=[("batch_id", str)],
    signature="<batch_id or item id>",
)
def batch(state: Any, batch_id: str, **kwargs: Any) -> dict[str, Any]:
    """One of this worker's recent batches, by its id or one of its items' ids: every item's
    id and outcome, the flush reason, the time it took, whether the function raised."""
    batching = _batching(state)
    if batching is None:
        return {"error": "this worker has no batching bootstep"}
    found = batching.history.find(batch_id) or batching.history.for_item(batch_id)
    if found is None:
        return {"error": f"{batch_id} is not among this worker's last {batching.history.size} "
                         f"batches (nor an item of one); a batch id starts with the node name "
                         f"of the worker that ran it: ask that one (-d <node name>)"}
    return found


@control_command(
    args=[("task_name", str)],
    variadic="settings",
    signature=f"<task_name> <option=value> [option=value ...] ({', '.join(RECONFIGURABLE)})",
)
def configure_batching(state: Any, task_name: str, settings: Any = None,
                       **kwargs: Any) -> dict[str, Any]:
    """Change a batched task's settings on running workers (until they restart)."""
    task = state.app.tasks.get(task_name)
    if task is None or getattr(task, "_batch_spec", None) is None:
        batched = sorted(name for name, t in state.app.tasks.items()
                         if getattr(t, "_batch_spec", None) is not None)
        close = difflib.get_close_matches(task_name, batched, n=1, cutoff=0.6)
        hint = (f"; did you mean {close[0]}?" if close else
                f"; its batched tasks: {', '.join(batched) or 'none'}")
        return {"error": f"{task_name} is not a batched task of this worker{hint}"}
    batching = _batching(state)
    if batching is None:
        return {"error": "this worker has no batching bootstep"}
    try:
        changes = _parse(settings)
        if not changes:
            raise BatchedTaskOptionError(
                f"{task_name}: nothing to change; give option=value pairs, e.g. "
                f"max_batch_size=128 wait_ms=10")
        return {"ok": batching.reconfigure(task, changes)}
    except BatchedTaskDefinitionError as exc:  # a wrong type or range: the check's own words
        return {"error": str(exc)}


def _parse(settings: Mapping[str, Any] | Iterable[str] | None) -> dict[str, Any]:
    if settings is None:
        return {}
    if isinstance(settings, Mapping):
        return dict(settings)
    out: dict[str, Any] = {}
    for pair in settings:
        key, sep, value = str(pair).partition("=")
        if not sep or not key:
            raise BatchedTaskOptionError(f"{pair!r}: expected option=value, e.g. wait_ms=10")
        out[key.strip()] = value.strip()
    return out


_celery_rate_limit = Panel.data["rate_limit"]


@control_command(
    args=[("task_name", str), ("rate_limit", str)],
    signature="<task_name> <rate_limit (e.g., 5/s | 5/m | 5/h)>",
)
def rate_limit(state: Any, task_name: str, rate_limit: str, **kwargs: Any) -> Any:
    """Celery's ``rate_limit`` command, which refuses batched tasks instead of ignoring them."""
    task = state.app.tasks.get(task_name)
    if task is not None and getattr(task, "_batch_spec", None) is not None:
        return {"error": f"{task_name} is a batched task: rate limits don't apply to it (a batch "
                         f"is the unit of work); bound its throughput with max_batch_size and the "
                         f"number of pool processes instead"}
    return _celery_rate_limit(state, task_name, rate_limit, **kwargs)
