"""Batch -> pool: send a flushed batch to the pool as ONE job, and route the job's outcome back.

Every item is a real ``celery.worker.request.Request``; the job's callbacks call each item's own
``on_accepted`` / ``on_success`` / ``on_failure`` / ``on_timeout``, so acknowledgement, task
events (Flower), ``inspect active``, worker-lost and time-limit handling are Celery's own.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

from celery.utils.log import get_logger

from ._celery_internals import pool_item
from ._kombu_redis import ack_many
from .buffer import PrefetchCredit
from .execution import execute_batch

logger = get_logger(__name__)


class BatchJob:
    """The pool callbacks of one batch: fan each one out to the batch's requests."""

    __slots__ = ("requests", "credit", "finished")

    def __init__(self, requests: Sequence[Any], credit: PrefetchCredit,
                 finished: Callable[[], None]) -> None:
        self.requests = requests
        self.credit = credit
        self.finished = finished

    def on_accepted(self, pid: int, time_accepted: float) -> None:
        for req in self.requests:
            _guard(req.on_accepted, pid, time_accepted)

    def on_timeout(self, soft: bool, timeout: float) -> None:
        for req in self.requests:
            _guard(req.on_timeout, soft, timeout)

    def on_done(self, replies: Any) -> None:
        if not isinstance(replies, list):  # threads/solo report a lost job as an ExceptionInfo
            return self.on_error(replies)
        if logger.isEnabledFor(logging.INFO) and self.requests:
            # One line per batch, never payloads (Celery's per-task success line logs the result).
            failed = sum(1 for reply in replies if reply[0])
            logger.info("Batch of %d %s done in %.3fs: %d succeeded, %d failed or retried",
                        len(replies), self.requests[0].name, replies[0][2] if replies else 0.0,
                        len(replies) - failed, failed)
        try:
            if self.requests and self.requests[0].task.acks_late:
                # Results are stored: acknowledge the succeeded items together.
                _guard(ack_many, [req for req, reply in zip(self.requests, replies) if not reply[0]])
            for req, reply in zip(self.requests, replies):
                _guard(req.on_success, reply)
        finally:
            self._finished()

    def on_error(self, exc_info: Any) -> None:
        try:
            for req in self.requests:
                _guard(req.on_failure, exc_info)
        finally:
            self._finished()

    def _finished(self) -> None:
        self.credit.release(len(self.requests))
        self.finished()


def _guard(handler: Callable[..., Any], *args: Any) -> None:
    # One item's handler failing (a backend hiccup while marking it) must not strand the others.
    try:
        handler(*args)
    except Exception:
        logger.exception("celery_batched: %s raised", getattr(handler, "__qualname__", handler))


class BatchDispatcher:
    """Turns a flushed batch into one pool job."""

    def __init__(self, pool: Any, hostname: str, send_repr: bool,
                 on_batch: Callable[[str, int], None], on_slot_free: Callable[[], None],
                 slots: int) -> None:
        self.pool = pool
        self.hostname = hostname
        self.send_repr = send_repr
        self.on_batch = on_batch
        self.on_slot_free = on_slot_free
        self.slots = slots
        self.in_flight = 0
        self._lock = threading.Lock()

    def pool_busy(self) -> bool:
        """Every pool process has a batch (running or queued for it)."""
        return self.in_flight >= self.slots

    def _job_finished(self) -> None:
        with self._lock:
            self.in_flight -= 1
        self.on_slot_free()

    def __call__(self, batch: list[Any], credit: PrefetchCredit) -> None:
        live = [req for req in batch if not req.revoked()]  # revoked()/expired: marked REVOKED, acked
        if len(live) < len(batch):
            credit.release(len(batch) - len(live))
        if not live:
            return
        task = live[0].task
        items = [pool_item(req) for req in live]
        job = BatchJob(live, credit, self._job_finished)
        with self._lock:
            self.in_flight += 1
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("celery_batched: %s: batch of %d", task.name, len(live))
        self.on_batch(task.name, len(live))
        try:
            self.pool.apply_async(
                execute_batch,
                args=(task, items, self.send_repr, self.hostname),
                accept_callback=job.on_accepted,
                callback=job.on_done,
                error_callback=job.on_error,
                timeout_callback=job.on_timeout,
                soft_timeout=task.soft_time_limit,
                timeout=task.time_limit,
                correlation_id=live[0].id,
            )
        except Exception:
            logger.exception("celery_batched: %s: the pool refused a batch of %d; "
                             "handing its messages back to the broker", task.name, len(live))
            for req in live:
                req.reject(requeue=True)
            credit.release(len(live))
            with self._lock:
                self.in_flight -= 1
