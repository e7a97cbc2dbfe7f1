"""Per-item acks, events and worker state, on the consumer's thread, once outcomes are recorded.

Successes are acknowledged together (one round trip on Redis) and get a ``task-succeeded``
event when task events are on. Every other outcome goes through the item's own Celery
``Request`` handlers, built for the occasion, so failures, retries, time limits and lost workers
are acknowledged, rejected or requeued exactly as Celery does it for ordinary tasks (and as the
installed Celery release does it). Items whose outcome could not be stored go back to the broker.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from billiard.einfo import ExceptionInfo
from celery.utils.log import get_logger

from .._internals import trace, worker
from .._internals.events import BatchEventer
from .._internals.kombu_redis import ack_many
from ..observers import BatchOutcome, Observers
from ..protocol import BatchedTaskLike, BatchReply, Outcome
from .writer import Written

if TYPE_CHECKING:
    from .batch import Batch
    from .item import Item

logger = get_logger("celery_batched.batches")


class Completion:
    """What the consumer does when a batch starts, finishes, fails or times out."""

    def __init__(self, consumer: Any, ack: Callable[..., None], observers: Observers) -> None:
        self.consumer = consumer
        self._ack = ack  # ConsumerThread.call_ack
        self.observers = observers

    def _events_on(self, task: BatchedTaskLike) -> bool:
        return worker.task_events_on(self.consumer.event_dispatcher, task)

    def accepted(self, batch: Batch, pid: int, time_accepted: float) -> None:
        """The pool started the batch: ``task-started`` per item, early acks."""
        items = batch.items
        for item in items:
            item.on_accepted(pid, time_accepted)
        worker.task_accepted_many(items, batch.task.name)
        if not batch.task.acks_late:
            self._ack(ack_many, [it.message for it in items], items[0].source.connection_errors)
        if self._events_on(batch.task):
            send = self.consumer.event_dispatcher.send
            for item in items:
                send("task-started", uuid=item.id, **batch_fields(batch, item))

    def finished(self, batch: Batch, reply: BatchReply, written: Written | None) -> None:
        """Every item's outcome is recorded (or could not be): acknowledge, report, release."""
        task, items = batch.task, batch.items
        acks_late = task.acks_late
        events = self._events_on(task)
        send = self.consumer.event_dispatcher.send if events else None
        done: list[Any] = []
        handed_back = failed = retried = 0
        lost: list[str] = []
        states: list[str] = []  # each item's outcome, for the observers (``inspect batch``)
        # Each item's share of the batch's time: summed over items (Flower's runtime metric),
        # it is the time the batch took, not n times that. The whole is ``batch_runtime_s``.
        share = reply.runtime / len(items)
        batch.runtime_s = reply.runtime  # failed items' events carry it too (``batch_fields``)
        written_iter = iter(written or ())
        for i, code in enumerate(reply.codes):  # ints, compared with the IntEnum's values
            item = items[i]
            extra = reply.extras.get(i)
            if code == Outcome.STORE:
                status, extra = next(written_iter)
                code = int(status)
            if code == Outcome.DONE:
                done.append(item)
                states.append(SUCCEEDED)
                if send is not None:
                    send("task-succeeded", uuid=item.id, result=extra, runtime=share,
                         **batch_fields(batch, item))
            elif code in (Outcome.FAILED, Outcome.RETRIED):
                if self._handle(batch, item, events, "on_success", ((1, extra, share),),
                                stored=True, runtime=share):
                    handed_back += 1
                    states.append(HANDED_BACK)
                elif code == Outcome.FAILED:
                    failed += 1
                    states.append(FAILED)
                else:
                    retried += 1
                    states.append(RETRIED)
            elif code == Outcome.UNSTORED:
                states.append(HANDED_BACK)
                if acks_late:
                    handed_back += 1
                    self._hand_back(item)
                else:
                    lost.append(item.id)
                    worker.task_ready(item)
        if done:
            if acks_late:
                self._ack(ack_many, [it.message for it in done], done[0].source.connection_errors)
                worker.restore_prefetch_after_acks(self.consumer, len(done))
            worker.task_ready_many(done)
        if handed_back:
            logger.warning("celery_batched: batch %s of %s: %d item(s) handed back to the broker: "
                           "their outcome could not be stored", batch.id, task.name, handed_back)
        if lost:
            logger.error("celery_batched: batch %s of %s: the outcome of %d item(s) could not be "
                         "stored, and their messages were acknowledged when the batch started "
                         "(acks_late=False): they stay PENDING. Keep acks_late=True (the "
                         "default) to have them run again instead. Items: %s", batch.id,
                         task.name, len(lost), _bounded_ids(lost))
        self._log(batch, reply, len(done), failed, retried, handed_back + len(lost))
        self.observers.finished(batch, BatchOutcome(
            len(done), failed, retried, handed_back + len(lost), reply.runtime, tuple(states),
            reply.setup_s, reply.raised))
        batch.credit.release(len(items))

    def failed(self, batch: Batch, exc_info: ExceptionInfo) -> None:
        """The pool lost the job (worker lost, terminated, hard time limit): Celery's handling,
        except that no item is acknowledged before its failure is stored."""
        events = self._events_on(batch.task)
        states = tuple(HANDED_BACK if self._handle(batch, item, events, "on_failure", (exc_info,))
                       else FAILED for item in batch.items)
        handed_back = states.count(HANDED_BACK)
        self.observers.finished(batch, BatchOutcome(
            0, len(batch.items) - handed_back, 0, handed_back, None, states))
        logger.error("celery_batched: batch %s of %d %s failed in the pool: %r%s; items: %s",
                     batch.id, len(batch.items), batch.task.name,
                     getattr(exc_info, "exception", exc_info),
                     f"; {handed_back} item(s) handed back to the broker: their failure could "
                     f"not be stored" if handed_back else "",
                     _bounded_ids([it.id for it in batch.items]))
        batch.credit.release(len(batch.items))

    def timed_out(self, batch: Batch, soft: bool, timeout: float) -> None:
        if soft:
            logger.warning("celery_batched: batch %s of %d %s: soft time limit (%ss) exceeded",
                           batch.id, len(batch.items), batch.task.name, timeout)
            return
        events = self._events_on(batch.task)
        for item in batch.items:
            self._handle(batch, item, events, "on_timeout", (soft, timeout))

    def _handle(self, batch: Batch, item: Item, events: bool, handler: str, args: tuple[Any, ...],
                stored: bool = False, runtime: float | None = None) -> bool:
        """Celery's ``Request.<handler>(*args)`` for one item, its acknowledgement held until
        the handler returned; True if the item went back to the broker instead.

        ``stored``: the pool stored the item's outcome already. A handler that raised because
        the backend did not take a write hands the item back; one that raised for another
        reason (Celery's re-raises a ``MemoryError`` before it acknowledges anything) is
        finished here, so that no item is left unacknowledged with its prefetch slot freed.
        """
        req = self._request(batch, item, events, runtime)
        held = worker.HeldAcks(req)
        try:
            getattr(req, handler)(*args)
        except Exception as exc:
            if trace.is_outage(exc, batch.task.backend):
                held.discard()
                self._hand_back(item)
                return True
            held.release()
            logger.error("celery_batched: %s[%s]: Celery's %s raised %s: %s", batch.task.name,
                         item.id, handler, type(exc).__name__, exc)
            if not req.acknowledged:
                if not stored:
                    self._hand_back(item)
                    return True
                if batch.task.acks_late:
                    req.acknowledge()
                if events and handler == "on_success":
                    einfo = args[0][1]
                    req.send_event("task-failed", exception=_exception_text(einfo),
                                   traceback=getattr(einfo, "traceback", None))
        else:
            held.release()
        worker.task_ready(item)
        return False

    def _hand_back(self, item: Item) -> None:
        self._ack(_guard, item.reject, True)
        worker.task_ready(item)

    @staticmethod
    def _request(batch: Batch, item: Item, events: bool, runtime: float | None = None) -> Any:
        """The item's Celery ``Request``, whose own events carry the batch fields -- and, for a
        failed or retried item, its share of the batch's time as ``runtime``, which Celery's
        events leave out: Flower's runtime metric then counts the time of batches that failed."""
        req = item.request()
        if events:
            fields = batch_fields(batch, item)
            if runtime is not None:
                fields["runtime"] = runtime
            worker.with_batch_events(req, lambda eventer: BatchEventer(eventer, fields))
        return req

    def _log(self, batch: Batch, reply: BatchReply, succeeded: int, failed: int, retried: int,
             handed_back: int) -> None:
        if logger.isEnabledFor(logging.INFO):
            # One line per batch, never payloads (Celery's per-task success line logs the result).
            n = len(batch.items)
            setup = f", setup {_duration(reply.setup_s)}" if reply.setup_s else ""
            logger.info("Batch %s of %d %s (%s) done in %s (function %s%s, longest wait %s): "
                        "%d succeeded, %d failed, %d retried, %d handed back",
                        batch.id, n, batch.task.name, batch.reason, _duration(reply.runtime),
                        _duration(reply.call_s), setup,
                        _duration(batch.flushed_at - batch.first_buffered_at),
                        succeeded, failed, retried, handed_back)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("Batch %s items: %s", batch.id, " ".join(it.id for it in batch.items))


#: An item's outcome as the observers are told it (``BatchOutcome.items``) and metrics label it.
SUCCEEDED, FAILED, RETRIED, HANDED_BACK = "succeeded", "failed", "retried", "handed_back"
#: Item ids a log line names, at most (``inspect batch <id>`` lists them all).
LOGGED_IDS = 10


def _bounded_ids(ids: list[str]) -> str:
    more = len(ids) - LOGGED_IDS
    return " ".join(ids[:LOGGED_IDS]) + (f" and {more} more" if more > 0 else "")


def _duration(seconds: float) -> str:
    """``181 ms``, ``0.42 ms``, ``2.35 s``: readable at every scale a batch takes."""
    if seconds >= 10:
        return f"{seconds:.1f} s"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    ms = seconds * 1000
    return f"{ms:.0f} ms" if ms >= 10 else f"{ms:.2g} ms"


def _exception_text(einfo: Any) -> str:
    exc = trace.raw_exception(einfo) if hasattr(einfo, "exception") else einfo
    return f"{type(exc).__name__}({str(exc)!r})"


def _guard(handler: Callable[..., Any], *args: Any) -> None:
    # One item's handler failing (a backend hiccup while marking it) must not strand the others.
    try:
        handler(*args)
    except Exception:
        logger.exception("celery_batched: %s raised", getattr(handler, "__qualname__", handler))



def batch_fields(batch: Batch, item: Item) -> dict[str, Any]:
    """Which batch an item ran in, for its events (``_internals.events.BATCH_FIELDS``); once the
    pool answered, the whole batch's time too (``batch_runtime_s``), failed items included."""
    fields = {"batch_id": batch.id, "batch_size": len(batch.items), "flush_reason": batch.reason,
              "buffer_wait_ms": round((batch.flushed_at - item.buffered_at) * 1000.0, 1)}
    if batch.runtime_s is not None:
        fields["batch_runtime_s"] = round(batch.runtime_s, 6)
    return fields
