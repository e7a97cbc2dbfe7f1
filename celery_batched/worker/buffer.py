"""The buffer: where one batched task's messages wait, unacknowledged, for their batch.

Flush rule (Modal's ``@batched``): the first item into an empty batch starts the clock; the
batch is flushed as soon as it holds ``max_batch_size`` items or ``wait_ms`` has passed since
that first item, whichever comes first. A batch never holds more than ``max_batch_size`` items.
The policies (``policies.py``) refine it:

* ``batch_key``: one open batch per key, each with its own clock. At most ``max_open_keys``
  keys have items waiting; an item with a new key beyond that flushes the batch that has waited
  longest (reason ``max_open_keys``) to make room.
* ``max_batch_cost``: an item that would push its batch's cost over the bound flushes the batch
  first (reason ``max_batch_cost``); a batch that reaches the bound is flushed; an item costing
  more than the bound on its own runs alone.
* ``max_latency_ms``: the clock is the latency target's deadline (``latency.py``), and a batch
  that can't fill in time is flushed at once (reason ``latency_target``).
* ``preferred_batch_sizes``: a batch whose time is up (its clock, or a free process for a due
  batch) leaves at the largest preferred size it holds (reason ``preferred_size``); the rest,
  its newest items, stays to fill for one more wait (a new ``wait_ms`` clock, or its own
  latency deadline). An item is held back at most once: the next flush takes it, whatever the
  size, so with ``wait_ms`` no item waits more than twice ``wait_ms``.
* ``urgent_priority``: items whose message priority is at least that urgent (as the broker
  orders them: ``urgency.py``) batch apart from the rest, per key, with ``urgent_wait_ms``; no
  batch goes to a busy pool (full ones wait here, in ``_ready``), and when a process frees,
  urgent batches go first (reason ``urgent``) -- at most ``MAX_URGENT_IN_A_ROW`` ahead of a
  waiting other batch, so the rest is never starved -- and filled up with the other items of
  their key that wait (``_fill``): a call costs a fixed part whatever its size.

If every pool process is busy when a batch's time is up, it couldn't start anyway, so it keeps
filling until a process is free (``flush_if_due``, reason ``slot_free``) or it is full.

Everything here runs on the consumer's thread: puts come from the strategy, timer callbacks from
the event loop's timer (or Celery's timer thread for transports without an event loop; hence the
lock), ``flush_if_due`` from the completion of a batch.
"""

from __future__ import annotations

import bisect
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol

from ..spec import BatchSpec
from .latency import LatencyModel
from .prefetch import TaskCredit
from .urgency import MAX_URGENT_IN_A_ROW, UrgentKey, urgency

if TYPE_CHECKING:
    from .item import Item


class FlushReason(StrEnum):
    """Why a batch left the buffer (logs, ``batching_stats``, metrics, item events)."""

    SIZE = "size"
    WAIT = "wait_ms"
    SLOT_FREE = "slot_free"
    COST = "max_batch_cost"
    KEY_LIMIT = "max_open_keys"
    LATENCY = "latency_target"
    #: An item that could not join a batch (its key or cost raised): alone, and not run.
    INVALID = "invalid_item"
    RECONFIGURED = "reconfigured"
    #: A batch whose time was up left at a preferred size; its newest items wait once more.
    PREFERRED = "preferred_size"
    #: An urgent batch (``urgent_priority``) that went first to a free process.
    URGENT = "urgent"


class TimerLike(Protocol):
    def call_after(self, secs: float, fun: Callable[..., Any], args: tuple[Any, ...] = ...) -> Any: ...


Flush = Callable[[list["Item"], TaskCredit, FlushReason], None]
#: A batch leaving the buffer: its items, why, and its key.
_Flushed = tuple[list["Item"], FlushReason, Hashable]

_generations = itertools.count(1)


class _Open:
    """The batch being filled for one key."""

    __slots__ = ("items", "cost", "first_at", "generation", "timer", "deadline", "due", "held",
                 "costs")

    def __init__(self, first_at: float) -> None:
        self.items: list[Item] = []
        self.cost = 0.0
        self.first_at = first_at
        self.generation = next(_generations)
        self.timer: Any = None
        self.deadline = 0.0
        self.due = False
        #: How many of the first items were already held back once (preferred sizes).
        self.held = 0
        #: Each item's cost, kept only where a batch may be cut (preferred sizes and a cost bound).
        self.costs: list[float] | None = None


class BatchBuffer:
    """Collects one batched task's items and hands full or timed-out batches to ``flush``."""

    def __init__(self, spec: BatchSpec, timer: TimerLike, credit: TaskCredit, flush: Flush,
                 pool_busy: Callable[[], bool] = lambda: False,
                 latency: LatencyModel | None = None, high_first: bool = True) -> None:
        self.spec = spec
        self.credit = credit
        self.latency = latency
        self._timer = timer
        self._flush = flush
        self._pool_busy = pool_busy
        self._open: dict[Hashable, _Open] = {}
        self._count = 0
        self._max_size = spec.max_batch_size
        self._max_cost = spec.max_batch_cost
        self._max_keys = spec.max_open_keys
        self._preferred = _usable(spec)
        self._keep_costs = bool(spec.preferred_batch_sizes) and self._max_cost is not None
        self._is_urgent = urgency(spec.urgent_priority, high_first)
        self._urgent_wait_s = spec.urgent_wait_ms / 1000.0
        #: Flushed batches waiting for a free process (only with ``urgent_priority``).
        self._ready: deque[_Flushed] = deque()
        self._ready_urgent: deque[_Flushed] = deque()
        self._ready_count = 0
        self._streak = 0  # urgent batches that went ahead of a waiting other batch, in a row
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._count + self._ready_count

    @property
    def open_keys(self) -> int:
        return len(self._open)

    def put(self, item: Item, key: Hashable = None, cost: float = 0.0) -> None:
        self.credit.hold()
        flushes: list[_Flushed] = []
        urgent = self._is_urgent is not None and self._is_urgent(item)
        if urgent:
            key = UrgentKey(key)
        with self._lock:
            batch = self._open.get(key)
            if batch is None:
                if len(self._open) >= self._max_keys:
                    oldest = next(iter(self._open))
                    flushes.append((self._take(oldest), FlushReason.KEY_LIMIT, oldest))
                batch = self._open[key] = _Open(item.buffered_at)
            elif self._max_cost is not None and batch.cost + cost > self._max_cost:
                flushes.append((self._take(key), FlushReason.COST, key))
                batch = self._open[key] = _Open(item.buffered_at)
            batch.items.append(item)
            batch.cost += cost
            if self._keep_costs:
                if batch.costs is None:
                    batch.costs = []
                batch.costs.append(cost)
            self._count += 1
            n = len(batch.items)
            if n >= self._max_size:
                flushes.append((self._take(key), FlushReason.SIZE, key))
            elif self._max_cost is not None and batch.cost >= self._max_cost:
                flushes.append((self._take(key), FlushReason.COST, key))
            elif self.latency is not None and not urgent:
                self._plan(key, batch, item.buffered_at, flushes)
            elif n == 1:
                batch.timer = self._timer.call_after(
                    self._urgent_wait_s if urgent else self.spec.wait_s, self._on_timer,
                    (key, batch.generation))
        for items, reason, k in flushes:
            self._send(items, reason, k)

    def _send(self, items: list[Item], reason: FlushReason, key: Hashable) -> None:
        """Flush a batch; with ``urgent_priority``, while every process is busy, it waits in
        ``_ready`` instead (a batch queued in the pool could not be overtaken)."""
        if self._is_urgent is not None and self._pool_busy():
            with self._lock:
                ready = self._ready_urgent if type(key) is UrgentKey else self._ready
                ready.append((items, reason, key))
                self._ready_count += len(items)
            return
        self._flush(items, self.credit, reason)

    def put_alone(self, item: Item) -> None:
        """An item that can't join a batch (its key or cost could not be computed): a batch of
        its own, now. The function is not called for it."""
        self.credit.hold()
        self._flush([item], self.credit, FlushReason.INVALID)

    def _plan(self, key: Hashable, batch: _Open, now: float,
              flushes: list[_Flushed]) -> None:
        """``max_latency_ms``: flush now, or (re)arm the timer for the batch's deadline."""
        latency = self.latency
        assert latency is not None
        latency.arrived(key, now)
        deadline = latency.deadline(batch.first_at, len(batch.items))
        if not latency.worth_waiting(key, len(batch.items), now, deadline):
            if self._pool_busy():
                batch.due = True
            else:
                flushes.append((self._take(key), FlushReason.LATENCY, key))
            return
        if batch.timer is None or deadline < batch.deadline - 0.001:
            if batch.timer is not None:
                batch.timer.cancel()
            batch.deadline = deadline
            batch.timer = self._timer.call_after(
                max(0.0, deadline - now), self._on_timer, (key, batch.generation))

    def reconfigure(self, spec: BatchSpec) -> None:
        """New options on a running worker (``configure_batching``). Open batches that are now
        full or over the cost bound are flushed at once, in batches of the new size (and those
        waiting for a process are cut to it); clocks already running keep their deadline."""
        flushes: list[tuple[list[Item], Hashable]] = []
        with self._lock:
            self.spec = spec
            self._max_size = spec.max_batch_size
            self._max_cost = spec.max_batch_cost
            self._max_keys = spec.max_open_keys
            self._preferred = _usable(spec)
            self._urgent_wait_s = spec.urgent_wait_ms / 1000.0
            for key in list(self._open):
                batch = self._open[key]
                over_cost = self._max_cost is not None and batch.cost >= self._max_cost
                if len(batch.items) >= self._max_size or over_cost:
                    items = self._take(key)
                    flushes += [(items[i:i + self._max_size], key)
                                for i in range(0, len(items), self._max_size)]
            size = self._max_size
            for ready in (self._ready_urgent, self._ready):  # batches waiting for a process
                if any(len(entry[0]) > size for entry in ready):
                    split = [(items[i:i + size], reason, key) for items, reason, key in ready
                             for i in range(0, len(items), size)]
                    ready.clear()
                    ready.extend(split)
            while len(self._open) > self._max_keys:
                oldest = next(iter(self._open))
                flushes.append((self._take(oldest), oldest))
        self.credit.resize(spec.max_batch_size)
        for items, key in flushes:
            self._send(items, FlushReason.RECONFIGURED, key)

    def take_all(self) -> list[Item]:
        """Empty the buffer without flushing (the worker is stopping or lost its connection)."""
        with self._lock:
            items: list[Item] = []
            for ready in (self._ready_urgent, self._ready):
                while ready:
                    items += ready.popleft()[0]
            self._ready_count = 0
            for key in list(self._open):
                items += self._take(key)
            return items

    def flush_if_due(self) -> None:
        """A pool process became free: run the batches waiting for one (full ones, and partial
        ones whose time is over), oldest first and urgent ones first, while processes are free."""
        while True:
            with self._lock:
                if self._pool_busy():
                    return
                picked = self._next_ready()
                if picked is None:
                    return
            self._flush(picked[0], self.credit, picked[1])

    def _next_ready(self) -> tuple[list[Item], FlushReason] | None:
        urgent_key = other_key = _NONE
        for k, b in self._open.items():
            if b.due:
                if type(k) is UrgentKey:
                    urgent_key = k if urgent_key is _NONE else urgent_key
                elif other_key is _NONE:
                    other_key = k
        has_urgent = bool(self._ready_urgent) or urgent_key is not _NONE
        has_other = bool(self._ready) or other_key is not _NONE
        if has_urgent and (not has_other or self._streak < MAX_URGENT_IN_A_ROW):
            oldest = self._ready[0][2] if self._ready else other_key
            items, _, key = self._pop_ready(self._ready_urgent, urgent_key)
            assert type(key) is UrgentKey
            n = len(items)
            self._fill(items, key.key)
            # It went ahead of the oldest waiting batch, unless it took that batch's items along.
            carried = len(items) > n and oldest == key.key
            self._streak = self._streak + 1 if has_other and not carried else 0
            return items, FlushReason.URGENT
        if has_other:
            self._streak = 0
            from_ready = bool(self._ready)
            items, reason, key = self._pop_ready(self._ready, other_key)
            if from_ready:
                self._fill(items, key)
            return items, reason
        return None

    def _pop_ready(self, ready: deque[_Flushed], due_key: Hashable) -> _Flushed:
        if ready:
            items, reason, key = ready.popleft()
            self._ready_count -= len(items)
            return items, reason, key
        items, reason = self._take_due(due_key, FlushReason.SLOT_FREE)
        return items, reason, due_key

    def _fill(self, items: list[Item], key: Hashable) -> None:
        """A batch about to run fills its room with the oldest other items of ``key`` waiting
        here, then with those filling its open batch: an urgent batch takes them along (a call
        costs a fixed part whatever its size), and what an urgent batch took from a waiting
        batch is made up from the next. Not with ``max_batch_cost`` (costs are not kept).
        """
        room = self._max_size - len(items)
        if room <= 0 or self._max_cost is not None:
            return
        ready, i = self._ready, 0
        while room > 0 and i < len(ready):
            waiting, reason, k = ready[i]
            if k != key:
                i += 1
                continue
            taken = waiting[:room]
            items += taken
            room -= len(taken)
            self._ready_count -= len(taken)
            if len(taken) == len(waiting):
                del ready[i]
            else:
                ready[i] = (waiting[len(taken):], reason, k)
        batch = self._open.get(key)
        if batch is None or room <= 0:
            return
        if room >= len(batch.items):
            items += self._take(key)
            return
        items += batch.items[:room]
        del batch.items[:room]
        self._count -= room
        batch.held = max(0, batch.held - room)
        if batch.costs is not None:
            del batch.costs[:room]

    def _on_timer(self, key: Hashable, generation: int) -> None:
        with self._lock:
            batch = self._open.get(key)
            if batch is None or batch.generation != generation:
                return  # flushed since this timer was set
            batch.timer = None
            if self._pool_busy():
                batch.due = True
                return
            items, reason = self._take_due(
                key, FlushReason.LATENCY if self.latency is not None
                and type(key) is not UrgentKey else FlushReason.WAIT)
        self._flush(items, self.credit, reason)

    def _take_due(self, key: Hashable, reason: FlushReason) -> tuple[list[Item], FlushReason]:
        """A batch whose time is up: all of it; or, with ``preferred_batch_sizes``, its oldest
        items up to the largest preferred size that takes every item already held back, the
        rest kept (held back once) with a new clock."""
        batch = self._open[key]
        n = len(batch.items)
        cut = _cut(self._preferred, n, batch.held)
        if not cut:
            return self._take(key), reason
        now = time.monotonic()
        rest = batch.items[cut:]
        urgent = type(key) is UrgentKey
        deadline = now + (self._urgent_wait_s if urgent else self.spec.wait_s)
        if self.latency is not None and not urgent:  # the rest keeps to its own target
            deadline = self.latency.deadline(rest[0].buffered_at, len(rest))
            if deadline <= now:
                return self._take(key), reason
        items = self._take(key)
        kept = self._open[key] = _Open(rest[0].buffered_at)
        kept.items, kept.held, kept.deadline = rest, len(rest), deadline
        if batch.costs is not None:
            kept.costs = batch.costs[cut:]
            kept.cost = sum(kept.costs)
        self._count += len(rest)
        kept.timer = self._timer.call_after(deadline - now, self._on_timer, (key, kept.generation))
        return items[:cut], FlushReason.PREFERRED

    def _take(self, key: Hashable) -> list[Item]:
        batch = self._open.pop(key)
        if batch.timer is not None:
            batch.timer.cancel()
        self._count -= len(batch.items)
        return batch.items


_NONE: Any = object()


def _usable(spec: BatchSpec) -> tuple[int, ...]:
    """The preferred sizes a batch can reach under the current ``max_batch_size``."""
    return tuple(s for s in spec.preferred_batch_sizes if s <= spec.max_batch_size)


def _cut(sizes: tuple[int, ...], n: int, held: int) -> int:
    """Where a due batch of ``n`` is cut: the largest preferred size below ``n`` that takes the
    ``held`` items already held back once; 0 to take all ``n`` (a preferred size already, or
    no size fits)."""
    i = bisect.bisect_left(sizes, n)
    if i < len(sizes) and sizes[i] == n:
        return 0
    i -= 1  # sizes[i] < n
    if i >= 0 and sizes[i] >= held:
        return sizes[i]
    return 0
