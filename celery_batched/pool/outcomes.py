"""Per-item outcomes in the pool: decode and bind each item, then sort what the call returned.

For every item this decides who records its outcome:

* ``STORE`` -- a plain success the worker's main process stores (``writer.py``), in bulk and
  while this process runs the next batch: Redis result backends, no ``result_extended``, no
  chord, no success hook or signal receiver. Its ``link``/chain callbacks are sent from here
  first, as Celery's tracer sends them before storing.
* ``DONE`` -- any other success: stored here (bulk where the backend allows), then the success
  hooks run, as Celery's tracer does; or nothing to store (``ignore_result``).
* ``FAILED`` / ``RETRIED`` -- Celery's own failure and retry handling, per item, logged once
  per batch (one traceback for a call that raised, not one per item).
* ``UNSTORED`` -- the backend could not take its outcome: the consumer hands it back to the
  broker instead of acknowledging it.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Sequence
from typing import Any

from celery import signals, states
from celery.exceptions import Retry, SoftTimeLimitExceeded

from .._internals import trace, worker
from ..encoding import bounded_repr, plain
from ..errors import (
    BatchResultError,
    BatchSetupError,
    ItemArgumentsError,
    ItemDecodeError,
    ItemFailureStoreError,
    ItemResultEncodeError,
)
from ..protocol import BatchedTaskLike, BatchReply, Outcome, WireItem
from ..retry import RetryItem

logger = logging.getLogger(__name__)

#: Failed item ids a batch's ERROR line names, at most (``inspect batch`` lists them all).
LOGGED_IDS = 10
#: How the note on an exception stored for several items at once begins.
WHOLE_BATCH_NOTE = "celery_batched:"
#: Whole-call failures no item caused: no note blames a neighbour.
NO_CULPRIT: tuple[type[BaseException], ...] = (BatchSetupError, BatchResultError,
                                              SoftTimeLimitExceeded)

_accept_cache: dict[int, frozenset[str]] = {}


class ItemOutcomes:
    """One batch's items in the pool, from wire format to ``BatchReply``."""

    def __init__(self, task: BatchedTaskLike, items: Sequence[WireItem], hostname: str | None,
                 want_repr: bool, batch_id: str | None = None) -> None:
        self.task = task
        self.batch_id = batch_id
        self.items = items
        self.hostname = hostname
        self.want_repr = want_repr
        n = len(items)
        self.decoded: list[tuple[Sequence[Any], dict[str, Any], Any] | None] = [None] * n
        self.errors: dict[int, BaseException] = {}
        self.returned: Any = None
        self.positions: list[int] = []
        self._contexts: dict[int, Any] = {}

    def decode_and_bind(self, errors: dict[int, BaseException] | None = None,
                        ) -> list[tuple[int, tuple[Any, ...]]]:
        """Decode every body and bind it to the function's parameters; bad items fail alone, as
        do the items of ``errors``."""
        task = self.task
        accept = _accept_cache.get(id(task.app))
        if accept is None:
            accept = _accept_cache[id(task.app)] = worker.accepted_content_types(task.app)
        bind = task._batch_spec.bind_item
        rows = []
        items = self.items
        joined = None
        if "application/json" in accept and all(
                it[2] == "application/json" and it[3] == "utf-8" and type(it[1]) is bytes
                for it in items):
            joined = trace.decode_json_bodies([it[1] for it in items])
        for i, (headers, body, content_type, content_encoding, _) in enumerate(items):
            try:
                if joined is not None:
                    args, kwargs, embed = self.decoded[i] = trace.split_body(joined[i])
                else:
                    args, kwargs, embed = self.decoded[i] = trace.decode_body(
                        body, content_type, content_encoding, accept)
            except Exception as exc:
                self.errors[i] = ItemDecodeError(
                    f"{task.name}[{headers.get('id')}]: this item's message body could not be "
                    f"decoded as {content_type}: {type(exc).__name__}: {exc}. Send it with the "
                    f"task's serializer (accept_content={sorted(accept)}).")
                continue
            if errors and i in errors:
                self.errors[i] = errors[i]
                continue
            try:
                rows.append((i, bind(args, kwargs)))
            except ItemArgumentsError as exc:
                self.errors[i] = exc
        return rows

    def _embed(self, i: int) -> dict[str, Any]:
        decoded = self.decoded[i]
        return (decoded[2] if decoded is not None else None) or {}

    def context(self, i: int) -> Any:
        ctx = self._contexts.get(i)
        if ctx is None:
            headers, _, _, _, delivery = self.items[i]
            args, kwargs, embed = self.decoded[i] or ((), {}, None)
            ctx = self._contexts[i] = trace.make_context(
                headers, args, kwargs, embed, delivery, self.hostname)
        return ctx

    def announce_start(self) -> None:
        """STARTED (``track_started``) and ``task_prerun`` per item, as Celery's tracer does."""
        task = self.task
        live = [i for i in range(len(self.items)) if self.decoded[i] is not None]
        if task.track_started:
            started = {"pid": os.getpid(), "hostname": self.hostname}
            trace.store_results(
                task, [(self.items[i][0]["id"], started, self.context(i)) for i in live
                       if not trace.ignores_result(task, self.items[i][0])],
                states.STARTED, on_error=lambda k, exc: None)
        if signals.task_prerun.receivers:
            trace.announce_prerun(task, [self.context(i) for i in live])

    def set_returned(self, values: Any, positions: list[int]) -> None:
        self.returned, self.positions = values, positions

    def finish(self, runtime: float, call_s: float) -> BatchReply:
        """Record what the pool records; answer with one code per item."""
        task = self.task
        n = len(self.items)
        codes = bytearray(n)
        extras: dict[int, Any] = {}
        store_rows: list[int] = []   # positions in self.returned of STORE items
        done_here: list[tuple[int, Any]] = []
        failures: list[tuple[int, Any]] = []
        parent_stores = _parent_can_store(task)
        returned = self.returned
        is_array = returned is not None and not isinstance(returned, list)
        if is_array and not parent_stores:
            returned, is_array = returned.tolist(), False
        for k, i in enumerate(self.positions):
            value = returned[k]
            if not is_array and isinstance(value, (BaseException, RetryItem)):
                failures.append((i, value))
                continue
            headers = self.items[i][0]
            embed = self._embed(i)
            stores = (parent_stores and not embed.get("chord")
                      and not trace.ignores_result(task, headers))
            if not stores or embed.get("callbacks") or embed.get("chain"):
                value = value.tolist() if is_array else plain(value)  # what Celery can encode
            if embed.get("callbacks") or embed.get("chain"):
                try:
                    trace.dispatch_callbacks_and_chain(task, value, self.context(i))
                except Exception as exc:
                    failures.append((i, exc))
                    continue
            if stores:
                codes[i] = Outcome.STORE
                store_rows.append(k)
                if embed.get("errbacks"):
                    extras[i] = embed
            else:
                done_here.append((i, value))
        failures.extend(sorted(self.errors.items()))
        self._store_here(done_here, codes, extras, failures, runtime)
        self._record_failures(failures, codes, extras)
        if is_array:
            values = returned if len(store_rows) == len(returned) else returned[store_rows]
        else:
            values = [returned[k] for k in store_rows]
        return BatchReply(bytes(codes), values, extras, runtime, call_s)

    def _store_here(self, done: list[tuple[int, Any]], codes: bytearray, extras: dict[int, Any],
                    failures: list[tuple[int, Any]], runtime: float) -> None:
        """Successes the pool records itself: store (bulk), then the success hooks."""
        task = self.task
        to_store = [(i, v) for i, v in done
                    if not trace.ignores_result(task, self.items[i][0])]
        unencodable: dict[int, BaseException] = {}
        try:
            for i, v in to_store:
                if self._embed(i).get("chord"):  # mark_as_done runs the chord's part-return logic
                    trace.write_retried(task.backend, task.backend.mark_as_done,
                                        self.items[i][0]["id"], v, request=self.context(i))
            plain = [(i, v) for i, v in to_store if not self._embed(i).get("chord")]
            trace.store_results(
                task, [(self.items[i][0]["id"], v, self.context(i)) for i, v in plain],
                states.SUCCESS, lambda k, exc: unencodable.__setitem__(plain[k][0], exc))
        except Exception as exc:
            if not trace.is_outage(exc, task.backend):
                raise
            logger.error("celery_batched: %s: results of %d item(s) could not be stored (%s: %s);"
                         " they go back to the broker", task.name, len(to_store),
                         type(exc).__name__, exc)
            for i, _ in to_store:
                codes[i], extras[i] = Outcome.UNSTORED, f"{type(exc).__name__}: {exc}"
            done = [(i, v) for i, v in done if codes[i] != Outcome.UNSTORED]
        hooks = trace.has_success_hooks(task)
        for i, value in done:
            if i in unencodable:
                cause = unencodable[i]
                failures.append((i, ItemResultEncodeError(
                    f"{task.name}: the result for this item could not be stored: "
                    f"{type(cause).__name__}: {cause}. Return a value the result serializer "
                    f"({task.backend.serializer}) can encode.")))
                continue
            codes[i] = Outcome.DONE
            if self.want_repr:
                extras[i] = bounded_repr(value, task.resultrepr_maxsize)
            if hooks:
                try:
                    trace.run_success_hooks(task, self.context(i), value, runtime)
                except Exception:
                    logger.exception("%s[%s]: a success hook raised", task.name, self.items[i][0]["id"])

    def _record_failures(self, failures: list[tuple[int, Any]], codes: bytearray,
                         extras: dict[int, Any]) -> None:
        """Fail or retry items as Celery's tracer does; log once for the batch."""
        if not failures:
            return
        task = self.task
        infos: dict[int, Any] = {}  # one ExceptionInfo per distinct exception object
        # An exception the function raised for several items at once: each of them stores it.
        shared = Counter(id(o) for _, o in failures
                         if isinstance(o, Exception) and o.__traceback__ is not None)
        failed: Counter[str] = Counter()
        failed_ids: list[str] = []
        retried = 0
        raised: BaseException | None = None
        for i, outcome in failures:
            ctx = self.context(i)
            task.request_stack.push(ctx)
            try:
                if isinstance(outcome, RetryItem):
                    exc = trace.request_retry(task, outcome.exc, outcome.retry_kwargs())
                elif isinstance(outcome, Retry):
                    exc = outcome
                else:
                    exc = trace.autoretry(task, outcome)
                if isinstance(exc, Retry):
                    extras[i] = trace.record_retry(task, ctx, exc)
                    codes[i] = Outcome.RETRIED
                    retried += 1
                    continue
                einfo = infos.get(id(exc))
                if einfo is None:
                    if exc is outcome and shared[id(exc)] > 1:
                        self._note_whole_batch(exc, shared[id(exc)])
                    einfo = infos[id(exc)] = trace.exception_info(exc)
                try:
                    einfo = self._store_failure(ctx, einfo)
                except Exception as store_exc:
                    if trace.is_outage(store_exc, task.backend):
                        codes[i] = Outcome.UNSTORED
                        extras[i] = f"{type(store_exc).__name__}: {store_exc}"
                        continue
                    raise
                trace.failure_hooks(task, ctx, einfo)
                codes[i], extras[i] = Outcome.FAILED, einfo
                failed[f"{type(exc).__name__}: {exc}"] += 1
                failed_ids.append(ctx.id)
                if exc.__traceback__ is not None:
                    raised = exc
            except Exception as exc:  # sending the retry or recording it failed
                if trace.is_outage(exc, task.backend):
                    codes[i], extras[i] = Outcome.UNSTORED, f"{type(exc).__name__}: {exc}"
                else:  # a bug, not an outage: fail the item rather than requeue it forever
                    logger.exception("celery_batched: %s[%s]: recording its outcome raised",
                                     task.name, ctx.id)
                    codes[i], extras[i] = Outcome.FAILED, trace.exception_info(exc)
            finally:
                task.request_stack.pop()
        self._log(failed, failed_ids, retried, raised)

    def _note_whole_batch(self, exc: BaseException, count: int) -> None:
        """PEP 678 note on an exception stored for every item of a call that raised: an
        innocent item's stored traceback (``AsyncResult.traceback``, Flower) says so."""
        if isinstance(exc, NO_CULPRIT) or getattr(exc, "__notes__", None):
            return
        what = ("the whole batch" if count == len(self.items) else f"{count} items together of "
                f"batch")
        exc.add_note(f"{WHOLE_BATCH_NOTE} {self.task.name} raised this for {what} "
                     f"{self.batch_id} ({len(self.items)} items), not for this item alone: "
                     f"another item may have caused it. isolate_failures=True re-runs a batch "
                     f"that raised in halves until the failing items are alone.")

    def _store_failure(self, ctx: Any, einfo: Any) -> Any:
        """Store one item's FAILURE (retried while the backend refuses writes); the
        ``ExceptionInfo`` stored. An exception the backend can't take for what it is (a value
        too large, say) is stored as an ``ItemFailureStoreError`` saying so: acknowledging the
        item with nothing stored would leave it PENDING forever."""
        task = self.task
        backend = task.backend
        store = trace.store_errors_for(task, ctx)
        try:
            trace.write_retried(backend, backend.mark_as_failure, ctx.id,
                                trace.raw_exception(einfo), einfo.traceback, request=ctx,
                                store_result=store, call_errbacks=True)
            return einfo
        except Exception as exc:
            if trace.is_outage(exc, backend):
                raise
            logger.exception("celery_batched: %s[%s]: storing its failure raised", task.name,
                             ctx.id)
            original = trace.raw_exception(einfo)
            einfo = trace.exception_info(ItemFailureStoreError(
                f"{task.name}: this item failed with {type(original).__name__}: "
                f"{str(original)[:2000]}, which the result backend could not store "
                f"({type(exc).__name__}: {exc})"))
        trace.write_retried(backend, backend.mark_as_failure, ctx.id,
                            trace.raw_exception(einfo), einfo.traceback, request=ctx,
                            store_result=store, call_errbacks=True)
        return einfo

    def _log(self, failed: Counter[str], failed_ids: list[str], retried: int,
             raised: BaseException | None) -> None:
        name, n, batch_id = self.task.name, len(self.items), self.batch_id
        if failed:
            summary = "; ".join(f"{count} x {what[:200]}" for what, count in failed.most_common(3))
            more = f" (and {len(failed) - 3} other errors)" if len(failed) > 3 else ""
            exc_info = (type(raised), raised, raised.__traceback__) if raised is not None else None
            ids = " ".join(failed_ids[:LOGGED_IDS]) + (
                f" and {len(failed_ids) - LOGGED_IDS} more" if len(failed_ids) > LOGGED_IDS else "")
            logger.error("celery_batched: batch %s of %d %s: %d item(s) failed: %s%s; items: %s",
                         batch_id, n, name, sum(failed.values()), summary, more, ids,
                         exc_info=exc_info)
        if retried:
            logger.info("celery_batched: batch %s of %d %s: %d item(s) sent for retry", batch_id,
                        n, name, retried)

    def fail_all(self, exc: BaseException, runtime: float) -> BatchReply:
        """The batch broke outside the function: fail every item (or hand it back)."""
        codes = bytearray([Outcome.UNSTORED]) * len(self.items)
        extras: dict[int, Any] = {i: f"{type(exc).__name__}: {exc}" for i in range(len(self.items))}
        if trace.is_outage(exc, self.task.backend):  # say, the STARTED states: all go back
            return BatchReply(bytes(codes), [], extras, runtime, 0.0)
        try:
            self._record_failures([(i, exc) for i in range(len(self.items))], codes, extras)
        except Exception:
            logger.exception("celery_batched: %s: could not record the batch's failure", self.task.name)
        return BatchReply(bytes(codes), [], extras, runtime, 0.0)


def _parent_can_store(task: BatchedTaskLike) -> bool:
    from .._internals import redis_results

    return (redis_results.can_store(task.backend) and not trace.has_success_hooks(task))
