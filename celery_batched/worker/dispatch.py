"""Batch -> pool: send a flushed batch to the pool as ONE job, and route the job's outcome.

The job carries each item's headers and still-encoded body (``Item.wire``); the pool decodes
them (``execution.py``). Its callbacks may arrive on a pool thread; each is carried over to the
consumer's thread (``handoff.py``). Successes the pool left to the worker's main process
go to the result writer, and the batch completes (acks, events) once they are stored.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from billiard.einfo import ExceptionInfo
from celery.utils.log import get_logger

from .._internals import worker
from ..observers import BatchOutcome, Observers
from ..pool.execution import execute_batch
from ..protocol import BatchReply, Outcome
from .batch import Batch, BatchIds
from .buffer import FlushReason
from .completion import Completion, batch_fields
from .handoff import ConsumerThread
from .item import Item
from .prefetch import TaskCredit
from .writer import ResultWriter

logger = get_logger(__name__)

class BatchDispatcher:
    """Turns a flushed batch into one pool job and its outcome into a completed batch."""

    def __init__(self, consumer: Any, thread: ConsumerThread, completion: Completion,
                 writer: ResultWriter, slots: Callable[[], int],
                 observers: Observers, on_slot_free: Callable[[], None]) -> None:
        self.consumer = consumer
        self.pool = consumer.pool
        self.hostname = consumer.hostname
        self.thread = thread
        self.completion = completion
        self.writer = writer
        self.slots = slots
        self.observers = observers
        self.on_slot_free = on_slot_free
        self.in_flight = 0
        self.batch_ids = BatchIds(self.hostname)
        self.result_extended = bool(consumer.app.conf.find_value_for_key("extended", "result"))

    def pool_busy(self) -> bool:
        """Every pool process has a batch (running, or queued for it)."""
        return self.in_flight >= self.slots()

    def __call__(self, items: list[Item], credit: TaskCredit, reason: FlushReason) -> None:
        live = [it for it in items if not it.revoked()]  # revoked/expired: marked REVOKED, acked
        if len(live) < len(items):
            credit.release(len(items) - len(live))
        if not live:
            return
        task = live[0].task
        batch = Batch(task, live, credit, reason,
                      worker.task_events_on(self.consumer.event_dispatcher, task),
                      next(self.batch_ids))
        self.in_flight += 1
        self.observers.flushed(batch)
        call = self.thread.call
        try:
            self.pool.apply_async(
                execute_batch,
                args=(task, [it.wire() for it in live], batch.want_repr, self.hostname,
                      batch.preset_errors,
                      _batch_meta(batch) if self.result_extended else None, batch.id),
                accept_callback=lambda pid, t: call(self.completion.accepted, batch, pid, t),
                callback=lambda reply: call(self._done, batch, reply),
                error_callback=lambda exc_info: call(self._failed, batch, exc_info),
                timeout_callback=lambda soft, t: call(self.completion.timed_out, batch, soft, t),
                soft_timeout=task.soft_time_limit,
                timeout=task.time_limit,
                correlation_id=live[0].id,
            )
        except Exception:
            logger.exception("celery_batched: %s: the pool refused a batch of %d; "
                             "handing its messages back to the broker", task.name, len(live))
            for it in live:
                it.reject(requeue=True)
                worker.task_ready(it)
            credit.release(len(live))
            self.in_flight -= 1
            self.observers.finished(batch, BatchOutcome(0, 0, 0, len(live), None,
                                                            ("handed_back",) * len(live)))

    def _done(self, batch: Batch, reply: BatchReply | ExceptionInfo) -> None:
        self.in_flight -= 1
        if not isinstance(reply, BatchReply):  # threads/solo report a lost job as an ExceptionInfo
            self.completion.failed(batch, reply)
        else:
            self.observers.executed(batch, reply.runtime)
            if Outcome.STORE in reply.codes:
                self.writer.submit(batch, reply)
            else:
                self.completion.finished(batch, reply, None)
        self.on_slot_free()

    def _failed(self, batch: Batch, exc_info: ExceptionInfo) -> None:
        self.in_flight -= 1
        self.completion.failed(batch, exc_info)
        self.on_slot_free()


def _batch_meta(batch: Batch) -> dict[str, dict[str, Any]]:
    """``result_extended``: the batch fields each item's stored result meta carries."""
    return {it.id: batch_fields(batch, it) for it in batch.items}
