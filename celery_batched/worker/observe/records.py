"""What a worker remembers of each batched task's batches, for ``inspect batching_stats``.

Totals (batches, items, sizes, flush reasons) since the worker started, and a window of the
most recent batches for percentiles: batch size, each item's wait in the buffer, and the
batch's execution time in the pool. All of it is updated on the consumer's thread, once per
batch.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ...observers import BatchObserver, BatchOutcome

if TYPE_CHECKING:
    from ..batch import Batch

#: Batches (and, for waits, items) the percentiles are computed over.
WINDOW = 1024


class TaskRecord:
    """One batched task's batches on this worker."""

    def __init__(self) -> None:
        self.sizes: Counter[int] = Counter()
        self.reasons: Counter[str] = Counter()
        self.recent_sizes: deque[int] = deque(maxlen=WINDOW)
        self.recent_waits_ms: deque[float] = deque(maxlen=4 * WINDOW)
        self.recent_exec_ms: deque[float] = deque(maxlen=WINDOW)
        #: Items by outcome, and batches whose function raised, since the worker started.
        self.outcomes: Counter[str] = Counter()
        self.raised_batches = 0

    def flushed(self, batch: Batch) -> None:
        n = len(batch.items)
        self.sizes[n] += 1
        self.reasons[batch.reason] += 1
        self.recent_sizes.append(n)
        self.recent_waits_ms.extend(w * 1000.0 for w in batch.waits())

    def executed(self, runtime_s: float) -> None:
        self.recent_exec_ms.append(runtime_s * 1000.0)

    def finished(self, outcome: BatchOutcome) -> None:
        counts = self.outcomes
        counts["succeeded"] += outcome.succeeded
        counts["failed"] += outcome.failed
        counts["retried"] += outcome.retried
        counts["handed_back"] += outcome.handed_back
        self.raised_batches += outcome.raised > 0

    def snapshot(self) -> dict[str, Any]:
        return {
            "batches": sum(self.sizes.values()),
            "items": sum(size * n for size, n in self.sizes.items()),
            # [size, batches] pairs in numeric order: JSON object keys would sort as strings.
            "batch_sizes": [[size, n] for size, n in sorted(self.sizes.items())],
            "flush_reasons": dict(self.reasons),
            "succeeded": self.outcomes["succeeded"],
            "failed": self.outcomes["failed"],
            "retried": self.outcomes["retried"],
            "handed_back": self.outcomes["handed_back"],
            "batches_raised": self.raised_batches,
            "recent": {
                "batches": len(self.recent_sizes),
                "batch_size": percentiles(self.recent_sizes),
                "buffer_wait_ms": percentiles(self.recent_waits_ms),
                "execution_ms": percentiles(self.recent_exec_ms),
            },
        }


def percentiles(values: Sequence[float]) -> dict[str, float] | None:
    """p50, p99 and max (linear interpolation between closest ranks), or None if empty."""
    if not values:
        return None
    ordered = sorted(values)

    def at(p: float) -> float:
        k = (len(ordered) - 1) * p
        lo = int(k)
        hi = min(lo + 1, len(ordered) - 1)
        return round(ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo), 3)

    return {"p50": at(0.5), "p99": at(0.99), "max": round(ordered[-1], 3)}


class TaskRecords(BatchObserver):
    """Every batched task's ``TaskRecord`` on this worker, kept up to date as a batch observer."""

    def __init__(self) -> None:
        self.by_task: dict[str, TaskRecord] = {}

    def flushed(self, batch: Batch) -> None:
        record = self.by_task.get(batch.task.name)
        if record is None:
            record = self.by_task[batch.task.name] = TaskRecord()
        record.flushed(batch)

    def executed(self, batch: Batch, runtime_s: float) -> None:
        self.by_task[batch.task.name].executed(runtime_s)

    def finished(self, batch: Batch, outcome: BatchOutcome) -> None:
        self.by_task[batch.task.name].finished(outcome)
