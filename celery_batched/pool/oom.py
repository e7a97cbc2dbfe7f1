"""Split on out-of-memory: what a batch that doesn't fit does, and what the process remembers.

When the function raises one of the task's ``oom_errors`` (by default ``MemoryError`` and
``torch.cuda.OutOfMemoryError``), the CUDA cache is emptied and the batch is run again in
halves, recursively, down to single items; an item that runs out of memory alone fails alone.
Each pool process remembers the size that fitted (``FitLimit``) and cuts the following batches
into calls of at most that size, so they don't hit the error again. After ``GROW_AFTER``
successful calls at the limit it grows by a quarter, up to ``max_batch_size`` (memory may have
been freed, or the inputs were unusually large); if the grown size fails again, the limit goes
back to the size that last fitted.
"""

from __future__ import annotations

import sys
from typing import Any

#: Successful calls at the limit before it is allowed to grow.
GROW_AFTER = 8


class FitLimit:
    """The largest batch this process currently calls the function with, after an OOM."""

    def __init__(self, max_batch_size: int) -> None:
        self.max_batch_size = max_batch_size
        self.limit: int | None = None  # None: never ran out of memory, no limit
        self.fitted = 0  # the largest size that succeeded since the last out-of-memory error
        self._streak = 0

    def out_of_memory(self, n: int) -> None:
        self.limit = self.fitted if 0 < self.fitted < n else max(1, n // 2)
        self.fitted = 0
        self._streak = 0

    def succeeded(self, n: int) -> None:
        self.fitted = max(self.fitted, n)
        if self.limit is None or n < self.limit:
            return
        self._streak += 1
        if self._streak >= GROW_AFTER:
            self._streak = 0
            grown = self.limit + max(1, self.limit // 4)
            self.limit = None if grown >= self.max_batch_size else grown

    def snapshot(self) -> dict[str, Any]:
        return {"limit": self.limit, "fitted": self.fitted}


def fit_limit(task: Any) -> FitLimit:
    """This process's ``FitLimit`` for ``task`` (tasks are per process: prefork children each
    have their own; threads share one, as they share the device)."""
    limit = task.__dict__.get("_celery_batched_fit")
    if limit is None:
        limit = task.__dict__["_celery_batched_fit"] = FitLimit(task._batch_spec.max_batch_size)
    return limit


def free_cuda_cache() -> None:
    """``torch.cuda.empty_cache()`` if this process uses CUDA: the failed call's cached blocks
    are released before the halves run."""
    torch = sys.modules.get("torch")
    if torch is None:
        return
    try:
        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()
    except Exception:  # a broken CUDA context: the halves will tell
        pass
