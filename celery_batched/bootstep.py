"""The consumer bootstep that owns every batched task's buffer in a worker.

Registered on the app's consumer blueprint as soon as a ``BatchedTask`` is bound to the app.
It lives as long as the consumer; its buffers live as long as one broker connection: when the
connection is lost or the worker stops, buffered messages are handed back to the broker
(rejected with requeue) rather than run, since their delivery tags die with the channel.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from celery import bootsteps
from celery.utils.log import get_logger
from celery.worker.control import inspect_command
from celery.worker.state import task_ready

from ._kombu_redis import install_bulk_fetch
from .buffer import BatchBuffer, PrefetchCredit
from .dispatch import BatchDispatcher

logger = get_logger(__name__)


class BatchingStep(bootsteps.StartStopStep):
    """Buffers batched tasks' messages in the consumer and flushes them to the pool."""

    name = "celery_batched.Batching"
    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        # Celery's own consumer steps publish themselves on the consumer (c.heart, c.gossip);
        # the batched tasks' strategies find their buffers here.
        c.batching = self
        self.consumer = c
        self.buffers: dict[str, BatchBuffer] = {}
        self.batch_sizes: dict[str, Counter[int]] = {}
        self._dispatcher: BatchDispatcher | None = None

    def start(self, c: Any) -> None:
        self.buffers = {}
        if c.app.conf.get("batching_redis_bulk_fetch", True) and c.task_consumer is not None:
            install_bulk_fetch(c.task_consumer.channel)
        eventer = c.event_dispatcher
        self._dispatcher = BatchDispatcher(
            c.pool, c.hostname, send_repr=bool(eventer and eventer.enabled),
            on_batch=self._count_batch, on_slot_free=self._flush_due, slots=_pool_slots(c.pool))

    def buffer_for(self, task: Any) -> BatchBuffer:
        buffer = self.buffers.get(task.name)
        if buffer is None:
            spec = task._batch_spec
            c = self.consumer
            assert self._dispatcher is not None
            slots = self._dispatcher.slots
            # Each pool slot running a batch, one waiting for a slot, one filling: the pool
            # never waits on the broker, and the worker never holds the whole queue.
            credit = PrefetchCredit(c.qos, cap=spec.max_batch_size * (slots + 2),
                                    headroom=spec.max_batch_size)
            buffer = self.buffers[task.name] = BatchBuffer(
                spec, c.timer, credit, self._dispatcher, pool_busy=self._dispatcher.pool_busy)
            self._check_visibility_timeout(task)
        return buffer

    def _check_visibility_timeout(self, task: Any) -> None:
        """Redis redelivers a message unacknowledged for ``visibility_timeout``: warn if a batch
        can outlast it (buffered wait + time limit), since its items would then run twice."""
        c = self.consumer
        if getattr(c.connection.transport, "driver_type", None) != "redis":
            return
        visibility = float((c.app.conf.broker_transport_options or {}).get("visibility_timeout", 3600))
        worst = task._batch_spec.wait_s + float(task.time_limit or 0)
        if worst >= visibility or (not task.time_limit and visibility < 600):
            logger.warning(
                "celery_batched: %s: Redis visibility_timeout is %.0fs; a message buffered for "
                "wait_ms plus a batch running longer than that is delivered again. Set "
                "time_limit on the task and keep visibility_timeout above wait_ms + time_limit.",
                task.name, visibility)

    def stop(self, c: Any) -> None:
        """Hand every buffered (not yet running) message back to the broker."""
        handed_back = 0
        for buffer in self.buffers.values():
            batch = buffer.take_all()
            for req in batch:
                req.reject(requeue=True)
                task_ready(req)
            buffer.credit.release(len(batch))
            handed_back += len(batch)
        self.buffers = {}
        if handed_back:
            logger.info("celery_batched: handed %d buffered message(s) back to the broker",
                        handed_back)

    def shutdown(self, c: Any) -> None:
        self.stop(c)

    def _flush_due(self) -> None:
        for buffer in list(self.buffers.values()):
            buffer.flush_if_due()

    def _count_batch(self, task_name: str, size: int) -> None:
        self.batch_sizes.setdefault(task_name, Counter())[size] += 1

    def info(self, c: Any) -> dict[str, Any]:
        return {"batching": self.stats()}

    def stats(self) -> dict[str, Any]:
        out = {}
        for name, sizes in self.batch_sizes.items():
            buffer = self.buffers.get(name)
            out[name] = {
                "batches": sum(sizes.values()),
                "items": sum(size * n for size, n in sizes.items()),
                "batch_sizes": {str(size): n for size, n in sorted(sizes.items())},
                "buffered": len(buffer) if buffer else 0,
                "held": buffer.credit.held if buffer else 0,
            }
        return out


def _pool_slots(pool: Any) -> int:
    """How many batches the pool runs at once: prefork processes, threads, or 1 (solo)."""
    return int(getattr(pool, "num_processes", None) or getattr(pool, "limit", None) or 1)


@inspect_command()
def batching_stats(state: Any, **kwargs: Any) -> dict[str, Any]:
    """Batches run per batched task: counts, batch-size histogram, messages buffered and held.

    ``celery_batched.batching_stats(app)`` or ``celery -A proj inspect batching_stats``.
    """
    batching = getattr(state.consumer, "batching", None)
    return batching.stats() if batching is not None else {}
