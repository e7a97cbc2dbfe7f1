"""Pool execution: decode a batch, make ONE call of the function, and sort out each item.

Runs in the pool (a prefork child, a pool thread, or the consumer itself with ``solo``). The
bodies arrive still encoded and are decoded here, off the consumer. Successes that the worker's
main process can store come back as values (``Outcome.STORE``), so this process is free for
the next
batch while they are written; everything Celery's tracer would do in the pool -- callbacks,
chords, success hooks, failures, retries -- happens here (``outcomes.py``).
"""

from __future__ import annotations

import inspect
import logging
import os
import threading
import time
from collections.abc import Sequence
from typing import Any

from celery import signals
from celery.exceptions import SoftTimeLimitExceeded

from .._internals import trace
from ..errors import BatchResultError, BatchSetupError
from ..policies import is_oom
from ..protocol import BatchedTaskLike, BatchReply, WireItem
from ..tuning import freeze_after_setup
from .event_loop import run_coroutine
from .oom import fit_limit, free_cuda_cache
from .outcomes import ItemOutcomes

_setup_lock = threading.Lock()
logger = logging.getLogger(__name__)


class _CallStats(threading.local):
    """What this thread's current batch spent in ``setup()`` and how many of its calls raised:
    the reply carries them to the worker's metrics (setup apart from execution, raised batches)."""

    setup_s = 0.0
    raised = 0


_stats = _CallStats()


def execute_batch(task: BatchedTaskLike, items: Sequence[WireItem], want_repr: bool = False,
                  hostname: str | None = None,
                  errors: dict[int, BaseException] | None = None,
                  batch_meta: dict[str, dict[str, Any]] | None = None,
                  batch_id: str | None = None) -> BatchReply:
    """Pool entry point: run one batch and answer with one code per item. ``errors``: items
    that fail without running (the consumer could not compute their key or cost).
    ``batch_meta``: with ``result_extended``, each item's batch fields for its stored metas.
    ``batch_id``: named in this batch's failure log line and whole-batch error notes.

    Never raises for a batch's own trouble: the threads and solo pools would lose the job.
    """
    started = time.monotonic()
    outcomes = ItemOutcomes(task, items, hostname, want_repr, batch_id)
    _stats.setup_s, _stats.raised = 0.0, 0
    meta_token = None
    if batch_meta:
        trace.add_batch_meta(task.backend)
        meta_token = trace.set_batch_meta(batch_meta)
    try:
        rows = outcomes.decode_and_bind(errors)
        if task.track_started or signals.task_prerun.receivers:
            outcomes.announce_start()
        call_started = time.monotonic()
        if rows:
            outcomes.set_returned(call_batch(task, [row for _, row in rows]), [i for i, _ in rows])
        call_s = time.monotonic() - call_started
        return outcomes.finish(time.monotonic() - started, call_s)._replace(
            setup_s=_stats.setup_s, raised=_stats.raised)
    except Exception as exc:
        if trace.is_outage(exc, task.backend):
            logger.error("celery_batched: %s: the result backend did not take this batch's "
                         "writes (%s: %s); its %d item(s) go back to the broker", task.name,
                         type(exc).__name__, exc, len(items))
        else:
            logger.exception("celery_batched: %s: batch %s of %d failed outside the function",
                             task.name, batch_id, len(items))
        return outcomes.fail_all(exc, time.monotonic() - started)
    finally:
        if meta_token is not None:
            trace.reset_batch_meta(meta_token)
        task.backend.process_cleanup()


def call_batch(task: BatchedTaskLike, rows: Sequence[tuple[Any, ...]]) -> Any:
    """Call the function for ``rows``: a list (or array) of one outcome per row.

    Usually one call. After an out-of-memory error this process calls it in chunks that fit
    (``oom.py``). If a call raises, every row of it gets that exception -- or, for an
    out-of-memory error or with ``isolate_failures``, its rows are split in halves and re-run
    until the failing rows are alone.
    """
    limit = fit_limit(task).limit if task._batch_spec.oom_errors else None
    if limit is None or len(rows) <= limit:
        return _call_splitting(task, rows)
    parts: list[Any] = []
    for i in range(0, len(rows), limit):
        chunk = rows[i:i + limit]
        if parts and _timed_out(parts[-1]):  # the batch's time is up: no further calls
            parts.append([parts[-1][0]] * len(chunk))
        else:
            parts.append(_call_splitting(task, chunk))
    return _concat(parts)


def _call_splitting(task: BatchedTaskLike, rows: Sequence[tuple[Any, ...]]) -> Any:
    oom_errors = task._batch_spec.oom_errors
    try:
        returned = _call_once(task, rows)
    except (BatchSetupError, SoftTimeLimitExceeded) as exc:
        # No item is to blame: splitting would re-run setup() per half, or run halves after
        # the batch's soft time limit until the hard one kills the process.
        _stats.raised += 1
        return [exc] * len(rows)
    except Exception as exc:
        _stats.raised += 1
        out_of_memory = bool(oom_errors) and is_oom(exc, oom_errors)
        if out_of_memory:
            free_cuda_cache()
            fit_limit(task).out_of_memory(len(rows))
        if (out_of_memory or task.isolate_failures) and len(rows) > 1:
            mid = len(rows) // 2
            first = _call_splitting(task, rows[:mid])
            if _timed_out(first):
                return _concat([first, [first[0]] * (len(rows) - mid)])
            return _concat([first, _call_splitting(task, rows[mid:])])
        return [exc] * len(rows)
    if oom_errors:
        fit_limit(task).succeeded(len(rows))
    return returned


def _timed_out(part: Any) -> bool:
    """A chunk's outcomes are its rows' ``SoftTimeLimitExceeded`` (lists only: an array is
    values)."""
    return isinstance(part, list) and bool(part) and isinstance(part[0], SoftTimeLimitExceeded)


def _concat(parts: list[Any]) -> Any:
    """Outcomes of consecutive chunks, as one array when every chunk returned an array of the
    same row shape and dtype; else a list with one row (or outcome) per item -- chunks padded
    to their own longest input give rows of different widths."""
    if all(type(p).__name__ == "ndarray" for p in parts) and \
            len({(p.shape[1:], p.dtype) for p in parts}) == 1:
        import numpy
        return numpy.concatenate(parts)
    out: list[Any] = []
    for part in parts:
        out += list(part)
    return out


def _call_once(task: BatchedTaskLike, rows: Sequence[tuple[Any, ...]]) -> Any:
    ensure_setup(task)
    columns = [list(col) for col in zip(*rows)]
    fun = trace.undecorated_run(task)
    spec = task._batch_spec
    n_pos = spec.n_positional
    returned = fun(*columns[:n_pos], **dict(zip(spec.param_names[n_pos:], columns[n_pos:])))
    if inspect.isawaitable(returned):
        returned = run_coroutine(_await(returned))
    return check_returned(task, returned, len(rows))


async def _await(awaitable: Any) -> Any:
    return await awaitable


def check_returned(task: BatchedTaskLike, returned: Any, n: int) -> Any:
    """The function's return value as ``n`` outcomes (a list, or a NumPy array with ``n`` rows),
    or :class:`BatchResultError`. A torch tensor becomes a NumPy array on the CPU."""
    kind = type(returned).__name__
    if isinstance(returned, list):
        values = returned
    elif isinstance(returned, tuple):
        values = list(returned)
    elif kind == "Tensor" and type(returned).__module__.startswith("torch"):
        values = _tensor_to_numpy(returned)
    elif kind == "ndarray" and getattr(returned, "ndim", 0) >= 1:
        values = returned
    else:
        hint = {
            "NoneType": "did it forget to `return` the list?",
            "generator": "return a list, e.g. `return list(...)`, not a generator",
            "dict": "return a list in the order of the inputs, e.g. `[d[k] for k in keys]`",
            "ndarray": "a 0-d array has no row per item; return one row per item",
        }.get(kind, "return a list with one result per item (or an array with one row per item)")
        raise BatchResultError(
            f"{task.name} must return a list of {n} results (one per item), "
            f"but returned {kind}: {hint}")
    if len(values) != n:
        what = (f"an array with {len(values)} rows" if kind in ("ndarray", "Tensor")
                else f"a list of {len(values)}")
        raise BatchResultError(
            f"{task.name} must return one result per item: it received {n} items "
            f"but returned {what}")
    return values


def _tensor_to_numpy(tensor: Any) -> Any:
    if getattr(tensor, "ndim", 0) < 1:
        raise BatchResultError("a 0-d tensor has no row per item; return one row per item")
    tensor = tensor.detach()
    if str(tensor.dtype) == "torch.bfloat16":  # NumPy has no bfloat16
        tensor = tensor.float()
    return tensor.cpu().numpy()


def ensure_setup(task: BatchedTaskLike) -> None:
    """Run ``task.setup()`` once in this process, before its first batch."""
    pid = os.getpid()
    if task.__dict__.get("_celery_batched_setup_pid") == pid:
        return
    with _setup_lock:
        if task.__dict__.get("_celery_batched_setup_pid") == pid:
            return
        started = time.monotonic()
        # Only a task's own setup() is timed: the base class's no-op isn't a model load.
        timed = getattr(task.setup, "__qualname__", "") != "BatchedTask.setup"
        try:
            task.setup()
        except Exception as exc:
            _stats.setup_s += (time.monotonic() - started) * timed
            raise BatchSetupError(
                f"{task.name}.setup() raised {type(exc).__name__}: {exc}; "
                f"the batch failed and setup() runs again before the next batch") from exc
        _stats.setup_s += (time.monotonic() - started) * timed
        task.__dict__["_celery_batched_setup_pid"] = pid
        freeze_after_setup(task.app)

