"""A flushed batch: what the worker knows of it from the flush to its last acknowledgement.

A leaf of the worker path (the dispatcher, the writer, completion and the observers all read
it), so that each of them can name its type without importing the others.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..protocol import BatchedTaskLike
from .buffer import FlushReason
from .prefetch import TaskCredit

if TYPE_CHECKING:
    from .item import Item



class BatchIds:
    """Batch ids unique across a fleet: ``<node name>:<6 hex per worker start>-<counter>``, e.g.
    ``worker@gpu-3:3f2a1c-17``. The node name says which worker to ask (``inspect batch``); the
    random tag tells apart two starts of the same node."""

    __slots__ = ("prefix", "_counter")

    def __init__(self, hostname: str | None) -> None:
        self.prefix = f"{hostname or 'worker'}:{uuid.uuid4().hex[:6]}-"
        self._counter = itertools.count(1)

    def __next__(self) -> str:
        return f"{self.prefix}{next(self._counter)}"


class Batch:
    """One flushed batch, from the flush to its last ack."""

    __slots__ = ("id", "task", "items", "credit", "reason", "first_buffered_at", "flushed_at",
                 "want_repr", "preset_errors", "runtime_s", "_waits")

    def __init__(self, task: BatchedTaskLike, items: Sequence[Item], credit: TaskCredit, reason: FlushReason,
                 want_repr: bool, batch_id: str) -> None:
        self.id = batch_id
        self.task = task
        self.items = items
        self.credit = credit
        self.reason = reason
        self.first_buffered_at = min(it.buffered_at for it in items)
        self.flushed_at = time.monotonic()
        self.want_repr = want_repr
        #: Items that fail without running (their ``batch_key``/``batch_cost`` raised), by
        #: index; None for a batch of items that all run.
        self.preset_errors: dict[int, BaseException] | None = None
        if reason is FlushReason.INVALID:
            self.preset_errors = {i: it.error for i, it in enumerate(items)
                                  if it.error is not None} or None
        #: Seconds the batch took in the pool, once it answered.
        self.runtime_s: float | None = None
        self._waits: list[float] | None = None

    def waits(self) -> list[float]:
        """Seconds each item waited in the buffer, in item order (computed once)."""
        if self._waits is None:
            flushed_at = self.flushed_at
            self._waits = [flushed_at - it.buffered_at for it in self.items]
        return self._waits
