"""The buffer: where one batched task's messages wait, unacknowledged, for their batch.

Flush rule (Modal's ``@batched``): the first item into an empty buffer starts the clock; the
buffer is flushed as soon as it holds ``max_batch_size`` items or ``wait_ms`` has passed since
that first item, whichever comes first. A batch never holds more than ``max_batch_size`` items.

Puts come from the consumer; timer callbacks come from the event loop's timer or, for transports
without an event loop, from Celery's timer thread; hence the lock.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Protocol

from .spec import BatchSpec


class QoSLike(Protocol):
    value: int

    def increment_eventually(self, n: int = 1) -> int: ...
    def decrement_eventually(self, n: int = 1) -> int: ...


class TimerLike(Protocol):
    def call_after(self, secs: float, fun: Callable[..., Any], args: tuple[Any, ...] = ...) -> Any: ...


class PrefetchCredit:
    """Raise the consumer's prefetch count by the messages batching holds, up to ``cap``.

    Celery sizes prefetch for one message per pool slot (times ``worker_prefetch_multiplier``);
    a batch needs ``max_batch_size`` messages in the worker at once. Each held message (buffered,
    or in a batch that hasn't finished) lifts the prefetch count by one -- as Celery does for ETA
    tasks -- plus ``headroom`` (a batch) once anything was held, so a whole batch can arrive at
    once; until ``cap`` is reached: unacknowledged messages stay bounded by ``cap`` plus Celery's
    own prefetch.
    """

    def __init__(self, qos: QoSLike | None, cap: int, headroom: int = 0) -> None:
        self.qos = qos
        self.cap = cap
        self.headroom = headroom
        self._used = False
        self.held = 0
        self._credits = 0
        self._lock = threading.Lock()

    def hold(self, n: int = 1) -> None:
        with self._lock:
            self.held += n
            self._used = True
            self._settle()

    def release(self, n: int) -> None:
        with self._lock:
            self.held = max(0, self.held - n)
            self._settle()

    def _settle(self) -> None:
        qos = self.qos
        if qos is None:
            return
        want = min(self.held + (self.headroom if self._used else 0), self.cap)
        if want > self._credits:
            before = qos.value
            qos.increment_eventually(want - self._credits)
            # QoS caps increments at worker_eta_task_limit; count only what it granted.
            self._credits += max(0, qos.value - before)
        elif want < self._credits:
            qos.decrement_eventually(self._credits - want)
            self._credits = want


class BatchBuffer:
    """Collects one batched task's requests and hands full or timed-out batches to ``flush``.

    One refinement of the time rule: if every pool process is busy when ``wait_ms`` expires, the
    partial batch couldn't start anyway, so it keeps filling until a process is free
    (``flush_if_due``) or it is full. Under load this gives bigger batches at no latency cost.
    """

    def __init__(self, spec: BatchSpec, timer: TimerLike, credit: PrefetchCredit,
                 flush: Callable[[list[Any], PrefetchCredit], None],
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

    def put(self, request: Any) -> None:
        self.credit.hold()
        batch = None
        with self._lock:
            self._items.append(request)
            if len(self._items) >= self.spec.max_batch_size:
                batch = self._take()
            elif len(self._items) == 1:
                self._timer_entry = self._timer.call_after(
                    self.spec.wait_s, self._on_timer, (self._generation,))
        if batch:
            self._flush(batch, self.credit)

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
        self._flush(batch, self.credit)

    def _on_timer(self, generation: int) -> None:
        with self._lock:
            if generation != self._generation or not self._items:
                return  # flushed by size since this timer was set
            self._timer_entry = None
            if self._pool_busy():
                self._due = True
                return
            batch = self._take()
        self._flush(batch, self.credit)

    def _take(self) -> list[Any]:
        # put() flushes at max_batch_size, so the buffer never holds more than one batch.
        batch, self._items = self._items, []
        self._due = False
        self._generation += 1
        if self._timer_entry is not None:
            self._timer_entry.cancel()
            self._timer_entry = None
        return batch
