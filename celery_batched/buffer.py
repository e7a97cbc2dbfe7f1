"""The buffer: where one batched task's messages wait, unacknowledged, for their batch.

Flush rule (Modal's ``@batched``): the first item into an empty buffer starts the clock; the
buffer is flushed as soon as it holds ``max_batch_size`` items or ``wait_ms`` has passed since
that first item, whichever comes first. A batch never holds more than ``max_batch_size`` items.

One refinement: if every pool process is busy when ``wait_ms`` expires, the partial batch
couldn't start anyway, so it keeps filling until a process is free (``flush_if_due``) or it is
full. Under load this gives bigger batches at no latency cost.

Everything here runs on the consumer's thread: puts come from the strategy, timer callbacks from
the event loop's timer (or Celery's timer thread for transports without an event loop; hence the
lock), ``flush_if_due`` from the completion of a batch.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Protocol

from .prefetch import TaskCredit
from .spec import BatchSpec

#: Why a batch was flushed (logs, stats).
SIZE, WAIT, SLOT_FREE = "size", "wait_ms", "slot free"


class TimerLike(Protocol):
    def call_after(self, secs: float, fun: Callable[..., Any], args: tuple[Any, ...] = ...) -> Any: ...


Flush = Callable[[list[Any], TaskCredit, str], None]


class BatchBuffer:
    """Collects one batched task's items and hands full or timed-out batches to ``flush``."""

    def __init__(self, spec: BatchSpec, timer: TimerLike, credit: TaskCredit, flush: Flush,
                 pool_busy: Callable[[], bool] = lambda: False) -> None:
        self.spec = spec
        self.credit = credit
        self._timer = timer
        self._flush = flush
        self._pool_busy = pool_busy
        self._items: list[Any] = []
        self._generation = 0
        self._timer_entry: Any = None
        self._due = False
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: Any) -> None:
        self.credit.hold()
        batch = None
        with self._lock:
            self._items.append(item)
            if len(self._items) >= self.spec.max_batch_size:
                batch = self._take()
            elif len(self._items) == 1:
                self._timer_entry = self._timer.call_after(
                    self.spec.wait_s, self._on_timer, (self._generation,))
        if batch:
            self._flush(batch, self.credit, SIZE)

    def take_all(self) -> list[Any]:
        """Empty the buffer without flushing (the worker is stopping or lost its connection)."""
        with self._lock:
            return self._take()

    def flush_if_due(self) -> None:
        """A pool process became free: run the partial batch whose wait is over."""
        with self._lock:
            if not (self._due and self._items) or self._pool_busy():
                return
            batch = self._take()
        self._flush(batch, self.credit, SLOT_FREE)

    def _on_timer(self, generation: int) -> None:
        with self._lock:
            if generation != self._generation or not self._items:
                return  # flushed by size since this timer was set
            self._timer_entry = None
            if self._pool_busy():
                self._due = True
                return
            batch = self._take()
        self._flush(batch, self.credit, WAIT)

    def _take(self) -> list[Any]:
        # put() flushes at max_batch_size, so the buffer never holds more than one batch.
        batch, self._items = self._items, []
        self._due = False
        self._generation += 1
        if self._timer_entry is not None:
            self._timer_entry.cancel()
            self._timer_entry = None
        return batch
