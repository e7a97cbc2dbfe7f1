"""The worker's recent batches by id, for ``celery inspect batch <batch_id>``.

From one failed item (its events, its stored error's note, a log line) an operator has its
batch id; this answers which items that batch held and what became of each -- the innocent
neighbours of a whole-batch error among them. Bounded: the last ``HISTORY`` batches of the
worker, kept as ids and a few numbers (never payloads), updated once per batch on the
consumer's thread.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from ...observers import BatchObserver, BatchOutcome

if TYPE_CHECKING:
    from ..batch import Batch

#: Batches a worker remembers for ``inspect batch``, the most recent ones.
HISTORY = 2048


class BatchEntry:
    """What ``inspect batch`` answers of one batch."""

    __slots__ = ("task", "item_ids", "reason", "flushed_at", "longest_wait_ms", "outcome")

    def __init__(self, batch: Batch) -> None:
        self.task = batch.task.name
        self.item_ids = tuple(it.id for it in batch.items)
        self.reason = str(batch.reason)
        self.flushed_at = time.time()
        self.longest_wait_ms = round((batch.flushed_at - batch.first_buffered_at) * 1000.0, 1)
        self.outcome: BatchOutcome | None = None

    def as_dict(self, batch_id: str) -> dict[str, Any]:
        outcome = self.outcome
        out: dict[str, Any] = {
            "batch_id": batch_id, "task": self.task, "size": len(self.item_ids),
            "flush_reason": self.reason, "flushed_at": round(self.flushed_at, 3),
            "longest_wait_ms": self.longest_wait_ms,
            "state": "running" if outcome is None else "finished",
        }
        if outcome is None:
            out["items"] = [{"id": i, "outcome": None} for i in self.item_ids]
            return out
        states = outcome.items or (None,) * len(self.item_ids)
        out["items"] = [{"id": i, "outcome": s} for i, s in zip(self.item_ids, states)]
        out["counts"] = {"succeeded": outcome.succeeded, "failed": outcome.failed,
                         "retried": outcome.retried, "handed_back": outcome.handed_back}
        out["runtime_s"] = None if outcome.runtime_s is None else round(outcome.runtime_s, 6)
        out["setup_s"] = round(outcome.setup_s, 6)
        # True: the function raised for items together, so a failed item's error may be a
        # neighbour's (isolate_failures=True finds the culprit).
        out["function_raised"] = outcome.raised > 0
        out["pool_lost_it"] = outcome.runtime_s is None
        return out


class BatchHistory(BatchObserver):
    """The last ``HISTORY`` batches of this worker, by id."""

    def __init__(self, size: int = HISTORY) -> None:
        self.size = size
        self.by_id: OrderedDict[str, BatchEntry] = OrderedDict()

    def flushed(self, batch: Batch) -> None:
        by_id = self.by_id
        by_id[batch.id] = BatchEntry(batch)
        if len(by_id) > self.size:
            by_id.popitem(last=False)

    def finished(self, batch: Batch, outcome: BatchOutcome) -> None:
        entry = self.by_id.get(batch.id)
        if entry is not None:
            entry.outcome = outcome

    def find(self, batch_id: str) -> dict[str, Any] | None:
        """The batch's items and outcomes, or None if this worker doesn't remember it."""
        entry = self.by_id.get(batch_id)
        return entry.as_dict(batch_id) if entry is not None else None

    def for_item(self, item_id: str) -> dict[str, Any] | None:
        """The remembered batch that held ``item_id`` (its latest run), or None."""
        for batch_id, entry in reversed(self.by_id.items()):
            if item_id in entry.item_ids:
                return entry.as_dict(batch_id)
        return None
