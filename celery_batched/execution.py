"""Pool execution: one call of the batched function for a whole batch.

Runs in the pool (a prefork child, a pool thread, or the consumer itself with ``solo``):
binds each item's arguments, calls the function once with one list per parameter, and checks
that the answer can be split into one outcome per item. ``results.finish_items`` then records
each outcome. Nothing here touches the broker.
"""

from __future__ import annotations

import inspect
import logging
import os
import threading
from collections.abc import Sequence
from time import monotonic
from typing import TYPE_CHECKING, Any

from celery import signals, states

from ._celery_internals import ignores_result, make_context, store_results
from .errors import BatchResultError, BatchSetupError, ItemArgumentsError
from .event_loop import run_coroutine
from .results import ItemReply, finish_items, record_failure

if TYPE_CHECKING:
    from celery.app.task import Context

    from .task import BatchedTask

#: One item as the consumer sends it to the pool: task id, request dict, args, kwargs, embed.
BatchItem = tuple[str, dict[str, Any], Sequence[Any], dict[str, Any], "dict[str, Any] | None"]

_setup_lock = threading.Lock()
logger = logging.getLogger(__name__)


def execute_batch(task: BatchedTask, items: Sequence[BatchItem], send_repr: bool = True,
                  hostname: str | None = None) -> list[ItemReply]:
    """Pool entry point: run one batch; return Celery's ``(failed, retval, runtime)`` per item.

    Never raises for a batch's own trouble: the threads and solo pools would lose the job.
    """
    try:
        return _execute(task, items, send_repr, hostname)
    except Exception as exc:
        logger.exception("celery_batched: %s: batch of %d failed outside the function",
                         task.name, len(items))
        return [record_failure(task, make_context(rd, args, kwargs, embed, hostname), exc, 0.0)
                for _, rd, args, kwargs, embed in items]


def _execute(task: BatchedTask, items: Sequence[BatchItem], send_repr: bool,
             hostname: str | None) -> list[ItemReply]:
    started = monotonic()
    spec = task._batch_spec
    contexts = [make_context(rd, args, kwargs, embed, hostname) for _, rd, args, kwargs, embed in items]
    outcomes: list[Any] = [None] * len(items)
    rows: list[tuple[Any, ...]] = []
    positions: list[int] = []
    for i, (_, _, args, kwargs, _) in enumerate(items):
        try:
            rows.append(spec.bind_item(args, kwargs))
            positions.append(i)
        except ItemArgumentsError as exc:
            outcomes[i] = exc
    announce_start(task, contexts)
    if rows:
        for pos, outcome in zip(positions, call_batch(task, rows)):
            outcomes[pos] = outcome
    try:
        return finish_items(task, contexts, outcomes, monotonic() - started, send_repr)
    finally:
        task.backend.process_cleanup()


def announce_start(task: BatchedTask, contexts: Sequence[Context]) -> None:
    """STARTED states (``track_started``) and ``task_prerun``, as Celery's tracer does per task."""
    if task.track_started:
        started = {"pid": os.getpid(), "hostname": contexts[0].hostname if contexts else None}
        store_results(task, [(c.id, started, c) for c in contexts if not ignores_result(task, c)],
                      states.STARTED, on_error=lambda i, exc: None)
    if signals.task_prerun.receivers:
        for ctx in contexts:
            task.request_stack.push(ctx)
            try:
                signals.task_prerun.send(sender=task, task_id=ctx.id, task=task, args=ctx.args,
                                         kwargs=ctx.kwargs)
            finally:
                task.request_stack.pop()


def call_batch(task: BatchedTask, rows: Sequence[tuple[Any, ...]]) -> list[Any]:
    """Call the function once for ``rows``; one outcome (value or exception) per row.

    If the call raises, every row gets that exception -- or, with ``isolate_failures``, the rows
    are split in halves and re-run until the failing rows are alone.
    """
    try:
        return _call_once(task, rows)
    except BatchSetupError as exc:
        return [exc] * len(rows)  # no item is to blame: splitting would re-run setup() per half
    except Exception as exc:
        if task.isolate_failures and len(rows) > 1:
            mid = len(rows) // 2
            return call_batch(task, rows[:mid]) + call_batch(task, rows[mid:])
        return [exc] * len(rows)


def _call_once(task: BatchedTask, rows: Sequence[tuple[Any, ...]]) -> list[Any]:
    ensure_setup(task)
    columns = [list(col) for col in zip(*rows)]
    # Celery's autoretry wraps ``run`` as a whole; retries are per item here (results.py).
    fun = task.__dict__.get("_orig_run") or task.run
    spec = task._batch_spec
    n_pos = spec.n_positional
    returned = fun(*columns[:n_pos], **dict(zip(spec.param_names[n_pos:], columns[n_pos:])))
    if inspect.isawaitable(returned):
        returned = run_coroutine(_await(returned))
    return check_returned(task, returned, len(rows))


async def _await(awaitable: Any) -> Any:
    return await awaitable


def check_returned(task: BatchedTask, returned: Any, n: int) -> list[Any]:
    """The function's return value as a list of ``n`` outcomes, or :class:`BatchResultError`."""
    if isinstance(returned, list):
        values = returned
    elif isinstance(returned, tuple):
        values = list(returned)
    else:
        hint = {
            "NoneType": "did it forget to `return` the list?",
            "generator": "return a list, e.g. `return list(...)`, not a generator",
            "dict": "return a list in the order of the inputs, e.g. `[d[k] for k in keys]`",
            "ndarray": "convert it with `.tolist()`",
            "Tensor": "convert it with `.tolist()`",
        }.get(type(returned).__name__, "return a list with one result per item")
        raise BatchResultError(
            f"{task.name} must return a list of {n} results (one per item), "
            f"but returned {type(returned).__name__}: {hint}")
    if len(values) != n:
        raise BatchResultError(
            f"{task.name} must return one result per item: it received {n} items "
            f"but returned a list of {len(values)}")
    return values


def ensure_setup(task: BatchedTask) -> None:
    """Run ``task.setup()`` once in this process, before its first batch."""
    pid = os.getpid()
    if task.__dict__.get("_celery_batched_setup_pid") == pid:
        return
    with _setup_lock:
        if task.__dict__.get("_celery_batched_setup_pid") == pid:
            return
        try:
            task.setup()
        except Exception as exc:
            raise BatchSetupError(
                f"{task.name}.setup() raised {type(exc).__name__}: {exc}; "
                f"the batch failed and setup() runs again before the next batch") from exc
        task.__dict__["_celery_batched_setup_pid"] = pid
