"""Backpressure at submit: refuse an item when its queue already holds ``max_backlog`` messages.

The broker queue is unbounded; a web front end should shed load (HTTP 429 with ``Retry-After``)
rather than queue hours of work. A producer reads the queue's length on a connection of its own,
at most once per ``REFRESH_S`` per queue (one round trip: ``_internals.client.queue_messages``),
and every send in between compares against that reading plus what this process sent since -- so
a burst from one process can't overshoot the bound by more than what other producers sent in the
same half second. A broker the gauge can't read from doesn't block sends: they go unchecked (with a
WARNING) for ``UNREADABLE_BACKOFF_S``, and Celery's own publish retries decide.

The drain rate behind ``Backpressure.retry_after`` comes from successive readings: what left the
queue between two reads is the earlier length, plus what this process sent, minus the later
length. Other producers' sends hide some of the drain, so the estimate errs long, never short.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

from celery import Celery

from .._internals.client import queue_messages
from ..errors import Backpressure

logger = logging.getLogger(__name__)

#: Seconds a queue-length reading is used for, at most.
REFRESH_S = 0.5
#: Weight of the newest drain-rate sample in the running estimate.
RATE_SMOOTHING = 0.5
#: Seconds the gauge waits for the broker when it (re)connects; past it the send goes unchecked.
CONNECT_TIMEOUT_S = 2.0
#: Seconds sends go unchecked after the queue's length could not be read.
UNREADABLE_BACKOFF_S = 5.0
#: Bounds of ``Backpressure.retry_after``, in seconds.
RETRY_AFTER_BOUNDS = (0.1, 300.0)


@dataclass
class _Queue:
    messages: int = 0
    read_at: float = float("-inf")
    sent_since_read: int = 0
    drain_per_s: float | None = None
    #: The last read failed: sends go unchecked until the next one.
    unreadable: bool = False


class BacklogGauge:
    """One app's view of its queues' lengths, shared by the threads of a producer process."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self._queues: dict[str, _Queue] = {}
        self._lock = threading.Lock()
        self._connection: Any = None
        self._channel: Any = None
        self._pid = os.getpid()

    def admit(self, task_name: str, queue: str, n: int, max_backlog: int) -> None:
        """Count ``n`` items as sent to ``queue``, or raise ``Backpressure`` if the queue holds
        ``max_backlog`` messages or more (or would, with them)."""
        with self._lock:
            if self._pid != os.getpid():  # forked (a pre-loading web server): a fresh start
                self._queues, self._connection, self._channel = {}, None, None
                self._pid = os.getpid()
            state = self._queues.setdefault(queue, _Queue())
            now = time.monotonic()
            if now - state.read_at >= REFRESH_S:
                self._refresh(queue, state, now)
            if state.unreadable:
                return
            backlog = state.messages + state.sent_since_read
            if backlog + n > max_backlog:
                raise self._refusal(task_name, queue, backlog, n, max_backlog, state)
            state.sent_since_read += n

    def _refresh(self, queue: str, state: _Queue, now: float) -> None:
        try:
            messages = self._read(queue)
        except Exception as exc:  # fail open: the send goes on, with Celery's publish retries
            logger.warning("celery_batched: can't read the length of queue %r (%s: %s): "
                           "sending without its max_backlog check for %gs", queue,
                           type(exc).__name__, exc, UNREADABLE_BACKOFF_S)
            state.messages, state.sent_since_read, state.unreadable = 0, 0, True
            state.read_at = now + UNREADABLE_BACKOFF_S - REFRESH_S
            state.drain_per_s = None
            return
        if state.read_at != float("-inf") and not state.unreadable:
            drained = state.messages + state.sent_since_read - messages
            sample = max(0.0, drained) / max(now - state.read_at, 1e-3)
            state.drain_per_s = sample if state.drain_per_s is None else (
                RATE_SMOOTHING * sample + (1 - RATE_SMOOTHING) * state.drain_per_s)
        state.messages, state.read_at, state.sent_since_read = messages, now, 0
        state.unreadable = False

    def _read(self, queue: str) -> int:
        """The queue's length, on this gauge's own connection (never a producer's channel: a
        passive declare of a missing queue closes an AMQP channel)."""
        for attempt in (1, 2):
            fresh = self._connection is None
            try:
                if self._channel is None:
                    if self._connection is None:
                        self._connection = self.app.connection_for_write(
                            connect_timeout=CONNECT_TIMEOUT_S)
                    self._channel = self._connection.channel()
                return queue_messages(self._channel, queue)
            except Exception as exc:
                self._channel = None
                if getattr(exc, "reply_code", None) == 404:  # AMQP: no such queue, none wait
                    return 0
                if self._connection is not None:
                    self._connection.release()
                    self._connection = None
                if fresh or attempt == 2:  # a stale connection gets one more try, a new one not
                    raise
        raise AssertionError("unreachable")

    @staticmethod
    def _refusal(task_name: str, queue: str, backlog: int, n: int, max_backlog: int,
                 state: _Queue) -> Backpressure:
        retry_after = None
        rate = state.drain_per_s
        if rate:
            low, high = RETRY_AFTER_BOUNDS
            retry_after = min(high, max(low, (backlog + n - max_backlog) / rate))
        items = "the item was" if n == 1 else f"these {n} items were"
        when = (f"Retry in about {retry_after:.1f} s (the queue drains ~{rate:,.0f} messages/s)"
                if retry_after is not None else
                "Retry in a few seconds (no drain measured yet)")
        return Backpressure(
            f"{task_name}: queue {queue!r} holds {backlog:,} messages, and max_backlog is "
            f"{max_backlog:,}: {items} not sent. {when}, or raise max_backlog, or add workers.",
            task=task_name, queue=queue, backlog=backlog,
            max_backlog=max_backlog, retry_after=retry_after)


_gauges: dict[int, BacklogGauge] = {}
_gauges_lock = threading.Lock()


def gauge_for(app: Celery) -> BacklogGauge:
    """The app's gauge in this process (made on first use)."""
    gauge = _gauges.get(id(app))
    if gauge is None or gauge.app is not app:
        with _gauges_lock:
            gauge = _gauges.get(id(app))
            if gauge is None or gauge.app is not app:
                gauge = _gauges[id(app)] = BacklogGauge(app)
    return gauge


def check(task: Any, n: int, limit: int | None, options: dict[str, Any],
          args: Any = (), kwargs: Any = None) -> None:
    """``max_backlog`` for ``n`` items of ``task`` sent with ``options``: raise ``Backpressure``
    or count them. Retries (``retries`` in the options: items already accepted once) and eager
    calls are never refused."""
    if limit is None or options.get("retries") or task.app.conf.task_always_eager:
        return
    queue = options.get("queue")
    if queue is None or not isinstance(queue, str):
        route = task.app.amqp.router.route(dict(options), task.name, args, kwargs or {})
        queue = route["queue"].name
    gauge_for(task.app).admit(task.name, queue, n, limit)
