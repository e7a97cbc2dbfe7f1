"""How many unacknowledged messages a batching worker holds: enough to fill batches, bounded.

Celery sizes prefetch for one message per pool process (times ``worker_prefetch_multiplier``);
a batch needs ``max_batch_size`` messages at once. Batching keeps its own count next to Celery's
(``Prefetch.extra``) and adds it only where the prefetch count reaches the broker (the QoS
callback), so Celery can raise, lower or overwrite its own value (ETA tasks, the reduction after
a reconnect) without corrupting batching's. Per task, the credit is one per held message
(buffered, running, or waiting for its result to be stored) plus one batch of headroom, capped
at ``max_batch_size * (pool processes + 2)`` -- with the pool size read live, so ``--autoscale``
moves the cap. Unacknowledged messages stay below Celery's own count plus the caps, under every
setting:

* ``worker_prefetch_multiplier=0`` (unlimited): the base becomes one message per process;
* ``worker_disable_prefetch`` (Redis): batching fetches only while a pool process is free, and
  its held messages don't count against Celery's one-per-free-process rule;
* RabbitMQ quorum queues: Celery applies the count per consumer (``basic.qos(global=False)``),
  and RabbitMQ only to consumers that start after it -- the count is static. Batching's share is
  then every batched task's cap, set once before the task consumer consumes
  (``Prefetch.set_static``), and credits no longer move it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from .._internals import worker

#: kombu's ceiling for a prefetch count (``kombu.common.PREFETCH_COUNT_MAX``).
PREFETCH_COUNT_MAX = 0xFFFF


class Prefetch:
    """Batching's share of one consumer connection's prefetch count."""

    def __init__(self, qos: Any, slots: Callable[[], int], disable_prefetch: bool = False) -> None:
        self.qos = qos
        self.slots = slots
        self.disable_prefetch = disable_prefetch
        self.extra = 0
        self.credits: list[TaskCredit] = []
        #: The count set once before consuming, where the prefetch count is static (else None).
        self.static: int | None = None
        self._static_slots = 0
        if qos is not None:
            self._wrap(qos)

    def _wrap(self, qos: Any) -> None:
        def with_batching(prefetch_count: int) -> int:
            base = prefetch_count or max(1, self._static_slots or self.slots())  # 0: unlimited
            return min(PREFETCH_COUNT_MAX, base + self.extra)

        worker.wrap_prefetch_sender(qos, with_batching)

    def credit_for(self, max_batch_size: int) -> TaskCredit:
        credit = TaskCredit(self, max_batch_size)
        self.credits.append(credit)
        return credit

    def set_static(self, slots: int, max_batch_sizes: Iterable[int]) -> tuple[int, int, int]:
        """The prefetch count is static (per-consumer QoS): batching's share is each batched
        task's cap with ``slots`` pool processes (the most ``--autoscale`` allows), sent once by
        ``apply`` before the task consumer consumes. Returns the count, Celery's base and
        batching's share."""
        self._static_slots = max(1, slots)
        self.extra = sum(size * (self._static_slots + 2) for size in max_batch_sizes)
        base = (self.qos.value if self.qos is not None else 0) or self._static_slots
        self.static = min(PREFETCH_COUNT_MAX, base + self.extra)
        return self.static, base, self.extra

    def apply(self) -> None:
        """Send the prefetch count now (consumer thread)."""
        if self.qos is not None:
            worker.resend_prefetch(self.qos, now=True)

    def held(self) -> int:
        return sum(c.held for c in self.credits)

    def _change(self, delta: int) -> None:
        # Static: a count sent now would never reach the consumer; the share stays as set.
        if delta and self.qos is not None and self.static is None:
            self.extra += delta
            worker.resend_prefetch(self.qos)  # by the consumer loop, at its next turn


class TaskCredit:
    """The messages one batched task holds, and the prefetch they earn."""

    def __init__(self, prefetch: Prefetch, max_batch_size: int) -> None:
        self.prefetch = prefetch
        self.max_batch_size = max_batch_size
        self.held = 0
        self._used = False
        self._contributed = 0

    @property
    def cap(self) -> int:
        slots = self.prefetch.slots()
        if self.prefetch.disable_prefetch:
            return self.max_batch_size * max(1, slots)
        return self.max_batch_size * (max(1, slots) + 2)

    def wanted(self) -> int:
        headroom = self.max_batch_size if self._used and not self.prefetch.disable_prefetch else 0
        return min(self.held + headroom, self.cap)

    def hold(self, n: int = 1) -> None:
        self.held += n
        self._used = True
        self._settle()

    def resize(self, max_batch_size: int) -> None:
        """The task's ``max_batch_size`` changed on a running worker: so do cap and headroom."""
        self.max_batch_size = max_batch_size
        self._settle()

    def release(self, n: int) -> None:
        self.held = max(0, self.held - n)
        self._settle()

    def _settle(self) -> None:
        # Prefetch.extra is the sum of every credit's last contribution; a new cap (the pool
        # grew or shrank) is picked up here too.
        wanted = self.wanted()
        self.prefetch._change(wanted - self._contributed)
        self._contributed = wanted
