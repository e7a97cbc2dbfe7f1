"""``max_latency_ms``: when to flush so that wait + execution stays within a latency target.

A fixed ``wait_ms`` is wrong at both ends: at a low arrival rate every item waits the full
``wait_ms`` for a batch that never fills; at a high rate the batch fills anyway. With a target
the buffer decides per batch, from what it has observed:

* the batch execution time, ``exec(n) = a + b * n``, fitted by exponentially weighted least
  squares over the batches this worker ran (``observe``);
* the arrival rate of each key's items (mean gap between arrivals, exponentially weighted).

A batch whose first item arrived at ``t0`` must be flushed by ``t0 + target - exec(n)``
(``deadline``), so its first item's wait plus the expected execution stays within the target. It
is flushed *before* that when waiting cannot fill it by then (``(max - n) * gap`` too long):
the items it would gain are not worth the wait (``worth_waiting``). Until there are
observations, execution counts as free and the rate as unknown (flush at once).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..observers import BatchObserver

if TYPE_CHECKING:
    from .batch import Batch

#: Weight of the newest observation in the running means.
ALPHA = 0.2
#: A key's arrival gap is forgotten after this many seconds of silence (a new burst starts).
STALE_GAP_S = 5.0


class LatencyModel:
    """The observed batch execution time and arrival gaps of one batched task."""

    def __init__(self, target_ms: float, max_batch_size: int) -> None:
        self.target_s = target_ms / 1000.0
        self.max_batch_size = max_batch_size
        # Exponentially weighted sums for the fit exec(n) = a + b*n.
        self._w = self._n = self._t = self._nn = self._nt = 0.0
        self._last_arrival: dict[object, float] = {}
        self._gap: dict[object, float] = {}

    def reconfigure(self, target_ms: float, max_batch_size: int) -> None:
        self.target_s = target_ms / 1000.0
        self.max_batch_size = max_batch_size

    def observe(self, n: int, seconds: float) -> None:
        """One batch of ``n`` items took ``seconds`` to execute."""
        keep = 1.0 - ALPHA
        self._w = keep * self._w + ALPHA
        self._n = keep * self._n + ALPHA * n
        self._t = keep * self._t + ALPHA * seconds
        self._nn = keep * self._nn + ALPHA * n * n
        self._nt = keep * self._nt + ALPHA * n * seconds

    def execution_s(self, n: int) -> float:
        """Expected execution time of a batch of ``n``."""
        if not self._w:
            return 0.0
        mean_n, mean_t = self._n / self._w, self._t / self._w
        var_n = self._nn / self._w - mean_n * mean_n
        if var_n < 0.25:  # batches all of about one size: no slope to fit
            return mean_t * (n / mean_n if mean_n else 1.0) if n > mean_n else mean_t
        b = max(0.0, (self._nt / self._w - mean_n * mean_t) / var_n)
        a = max(0.0, mean_t - b * mean_n)
        return a + b * n

    def arrived(self, key: object, now: float) -> None:
        last = self._last_arrival.get(key)
        self._last_arrival[key] = now
        if last is None:
            return
        gap = now - last
        if gap > STALE_GAP_S:
            self._gap.pop(key, None)
            return
        previous = self._gap.get(key)
        self._gap[key] = gap if previous is None else (1.0 - ALPHA) * previous + ALPHA * gap
        if len(self._last_arrival) > 4096:  # many short-lived keys: start over, bounded memory
            self._last_arrival = {key: now}
            self._gap = {key: self._gap[key]}

    def deadline(self, first_at: float, n: int) -> float:
        """When a batch of ``n`` whose first item arrived at ``first_at`` must be flushed."""
        return first_at + self.target_s - self.execution_s(n)

    def worth_waiting(self, key: object, n: int, now: float, deadline: float) -> bool:
        """Whether waiting until ``deadline`` can fill the batch (else: flush it now)."""
        if now >= deadline:
            return False
        gap = self._gap.get(key)
        if gap is None:
            return False
        return now + (self.max_batch_size - n) * gap <= deadline

    def snapshot(self) -> dict[str, float]:
        """The fitted model, for ``inspect batching_stats``."""
        return {"target_ms": self.target_s * 1000.0,
                "expected_exec_ms_1": round(self.execution_s(1) * 1000.0, 3),
                "expected_exec_ms_max": round(self.execution_s(self.max_batch_size) * 1000.0, 3)}


class LatencyModels(BatchObserver):
    """The ``LatencyModel`` of each task with ``max_latency_ms``: what it learned survives
    reconnects (a buffer per connection, one model per task); it learns from every batch that
    ran the function."""

    def __init__(self) -> None:
        self.by_task: dict[str, LatencyModel] = {}

    def for_task(self, name: str, target_ms: float, max_batch_size: int) -> LatencyModel:
        model = self.by_task.get(name)
        if model is None:
            model = self.by_task[name] = LatencyModel(target_ms, max_batch_size)
        return model

    def executed(self, batch: Batch, runtime_s: float) -> None:
        model = self.by_task.get(batch.task.name)
        if model is not None and not batch.preset_errors:
            model.observe(len(batch.items), runtime_s)
