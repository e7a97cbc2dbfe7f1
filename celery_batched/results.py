"""Per-item results: store each item's outcome and answer Celery's per-request handlers.

Successful items are stored in bulk (see ``_celery_internals.store_results``); failed and retried
items go through Celery's own ``TraceInfo.handle_error_state``, the code an ordinary task's
failure takes, so backends, errbacks, chords, ``on_failure`` and the ``task_failure``/
``task_retry`` signals behave exactly as for ordinary tasks. The reply per item is the
``(failed, retval, runtime)`` tuple that ``celery.worker.request.Request.on_success`` expects.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from celery import signals, states
from celery.app.trace import TraceInfo, task_has_custom
from celery.exceptions import Retry
from celery.utils.saferepr import saferepr

from ._celery_internals import (autoretry, dispatch_callbacks_and_chain, ignores_result,
                                request_retry, store_results)
from .errors import ItemResultEncodeError
from .outcomes import RetryItem

if TYPE_CHECKING:
    from celery.app.task import Context

    from .task import BatchedTask

logger = logging.getLogger(__name__)

#: What ``Request.on_success`` receives for one item: (failed, retval or ExceptionInfo, runtime).
ItemReply = tuple[int, Any, float]


def finish_items(task: BatchedTask, contexts: Sequence[Context], outcomes: Sequence[Any],
                 runtime: float, send_repr: bool) -> list[ItemReply]:
    """Record every item's outcome; return one reply per item, in order."""
    replies: list[ItemReply | None] = [None] * len(outcomes)
    failures: list[tuple[int, Any]] = []
    succeeded: list[int] = []
    bulk: list[int] = []
    for i, outcome in enumerate(outcomes):
        if isinstance(outcome, (Exception, RetryItem)):
            failures.append((i, outcome))
            continue
        ctx = contexts[i]
        try:
            if ctx.callbacks or ctx.chain:
                dispatch_callbacks_and_chain(task, outcome, ctx)
            if ignores_result(task, ctx):
                pass
            elif ctx.chord:
                task.backend.mark_as_done(ctx.id, outcome, request=ctx)
            else:
                bulk.append(i)
                continue
        except Exception as exc:
            failures.append((i, exc))
            continue
        succeeded.append(i)

    unencodable: dict[int, BaseException] = {}

    def on_store_error(k: int, exc: BaseException) -> None:
        unencodable[bulk[k]] = exc

    store_results(task, [(contexts[i].id, outcomes[i], contexts[i]) for i in bulk],
                  states.SUCCESS, on_store_error)
    for i in bulk:
        if i in unencodable:
            cause = unencodable[i]
            failures.append((i, ItemResultEncodeError(
                f"{task.name}: the result for this item could not be stored: "
                f"{type(cause).__name__}: {cause}. Return a value the result serializer "
                f"({task.backend.serializer}) can encode.")))
        else:
            succeeded.append(i)

    hooks = _SuccessHooks(task)
    for i in succeeded:
        replies[i] = (0, saferepr(outcomes[i], task.resultrepr_maxsize) if send_repr else None,
                      runtime)
        if hooks.any:
            hooks.run(contexts[i], outcomes[i], runtime)
    for i, outcome in failures:
        replies[i] = record_failure(task, contexts[i], outcome, runtime)
    return replies  # type: ignore[return-value]


class _SuccessHooks:
    """What Celery's tracer runs after an ordinary task succeeds, resolved once per batch."""

    def __init__(self, task: BatchedTask) -> None:
        self.task = task
        self.on_success = task_has_custom(task, "on_success")
        self.after_return = task_has_custom(task, "after_return")
        self.signal = bool(signals.task_success.receivers)
        self.postrun = bool(signals.task_postrun.receivers)
        self.any = self.on_success or self.after_return or self.signal or self.postrun

    def run(self, ctx: Context, retval: Any, runtime: float) -> None:
        task = self.task
        task.request_stack.push(ctx)
        try:
            if self.on_success:
                task.on_success(retval, ctx.id, ctx.args, ctx.kwargs)
            if self.signal:
                signals.task_success.send(sender=task, result=retval, runtime=runtime)
            if self.after_return:
                task.after_return(states.SUCCESS, retval, ctx.id, ctx.args, ctx.kwargs, None)
            if self.postrun:
                signals.task_postrun.send(sender=task, task_id=ctx.id, task=task, args=ctx.args,
                                          kwargs=ctx.kwargs, retval=retval, state=states.SUCCESS)
        except Exception:
            # The result is stored; like Celery's tracer, a failing hook doesn't undo it.
            logger.exception("%s[%s]: a success hook raised", task.name, ctx.id)
        finally:
            task.request_stack.pop()


def record_failure(task: BatchedTask, ctx: Context, outcome: Any, runtime: float) -> ItemReply:
    """Fail or retry one item the way Celery's tracer does for an ordinary task."""
    task.request_stack.push(ctx)
    try:
        if isinstance(outcome, RetryItem):
            exc = request_retry(task, outcome.exc, outcome.retry_kwargs())
        elif isinstance(outcome, Retry):
            exc = outcome
        else:
            exc = autoretry(task, outcome)
        state = states.RETRY if isinstance(exc, Retry) else states.FAILURE
        try:
            raise exc
        except BaseException:
            einfo = TraceInfo(state, exc).handle_error_state(task, ctx, eager=False)
        if task_has_custom(task, "after_return"):
            task.after_return(state, exc, ctx.id, ctx.args, ctx.kwargs, einfo)
        if signals.task_postrun.receivers:
            signals.task_postrun.send(sender=task, task_id=ctx.id, task=task, args=ctx.args,
                                      kwargs=ctx.kwargs, retval=exc, state=state)
        return (1, einfo, runtime)
    finally:
        task.request_stack.pop()
