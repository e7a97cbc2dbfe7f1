"""The consumer bootstep that wires a worker's batching path, and its remote-control commands.

Registered on the app's consumer blueprint as soon as a ``BatchedTask`` is bound to the app.
What lives as long as the worker is made at the first start: the consumer-thread hand-off, the
result writer, the dispatcher. What lives as long as one broker connection is made at every
start: the buffers and the prefetch credit. When the connection is lost or the worker stops,
buffered messages are handed back to the broker (rejected with requeue) rather than run, since
their delivery tags die with the channel; running batches finish and are acknowledged when their
results are stored -- at shutdown, before the event loop closes.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

from celery import bootsteps
from celery.utils.log import get_logger

from .. import observers, tuning
from .._internals import worker
from .._internals.kombu_redis import guard_close, install_bulk_fetch
from ..observers import Observers
from . import control  # noqa: F401  (registers the remote-control commands)
from .buffer import BatchBuffer
from .checks import check_result_serializer, check_worker
from .completion import Completion
from .dispatch import BatchDispatcher
from .handoff import ConsumerThread
from .latency import LatencyModels
from .observe.metrics import BatchMetrics
from .observe.records import TaskRecord, TaskRecords
from .prefetch import Prefetch
from .writer import ResultWriter

logger = get_logger(__name__)

#: How long a stopping worker waits for running batches' results to be stored, at most.
SHUTDOWN_DRAIN_S = 60.0


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
        check_result_serializer(c.app)  # before Celery builds its result backend (the banner)
        self.buffers: dict[str, BatchBuffer] = {}
        #: What ``inspect batching_stats`` reports, per task.
        self.records = TaskRecords()
        #: Prometheus metrics, when ``batching_metrics_port`` is set (``observe/metrics.py``).
        self.metrics: BatchMetrics | None = None
        #: What ``max_latency_ms`` learned, per task; it survives reconnects.
        self.latency_models = LatencyModels()
        #: Everything told about each batch: the above and the app's ``batching_observers``.
        self.observers = Observers([])
        self.thread: ConsumerThread | None = None
        self.writer: ResultWriter | None = None
        self.dispatcher: BatchDispatcher | None = None
        self.prefetch: Prefetch | None = None
        #: Serializes message handling with batch callbacks where there is no event loop
        #: (callbacks then come from the pool's result thread and the timer thread).
        self.thread_lock: Any = contextlib.nullcontext() if c.hub else threading.RLock()
        self._previous_switch: float | None = None
        # Before the pool forks its processes: they start with the heap frozen too, so their
        # own freeze after setup() collects only what was made since.
        self._froze = tuning.freeze_startup_heap(c.app)

    def start(self, c: Any) -> None:
        first = self.thread is None
        if self.thread is None:  # first start: what lives as long as the worker
            check_worker(c.app, c.connection.transport.driver_type,
                         getattr(c.controller, "max_concurrency", None) or self.slots())
            self._previous_switch = tuning.shorten_switch_interval(c.app)
            self.thread = ConsumerThread(c, self.thread_lock)
            port = c.app.conf.get("batching_metrics_port")
            if port:
                self.metrics = BatchMetrics(self._buffered)
                self.metrics.serve(int(port), c.app.conf.get("batching_metrics_addr") or "127.0.0.1")
            self.observers = Observers([
                self.records, self.latency_models, *([self.metrics] if self.metrics else []),
                *observers.from_config(c.app.conf.get("batching_observers"))])
            writer = ResultWriter()
            self.thread.drain_at_close(self._drain_writer, SHUTDOWN_DRAIN_S)
            self.dispatcher = BatchDispatcher(
                c, self.thread, Completion(c, self.thread.call_ack, self.observers), writer,
                self.slots, self.observers, on_slot_free=self._flush_due)
            writer.on_written = self.dispatcher.written
            self.writer = writer
        else:
            self.thread.arm()
        self.buffers = {}
        if c.task_consumer is not None:
            guard_close(c.task_consumer.channel)
            if c.app.conf.get("batching_redis_bulk_fetch", True):
                install_bulk_fetch(c.task_consumer.channel, self._direct_receiver)
        disable = bool(c.app.conf.get("worker_disable_prefetch")) and \
            c.connection.transport.driver_type == "redis"
        self.prefetch = Prefetch(c.qos, self.slots, disable_prefetch=disable)
        if disable and c.task_consumer is not None:
            self._disable_prefetch(c.task_consumer.channel.qos)
        quorum = worker.static_prefetch_queue(c)
        if quorum is not None:  # a count sent once the consumer consumes never reaches it
            count, base, share = self.prefetch.set_static(
                getattr(c.controller, "max_concurrency", None) or self.slots(),
                [t._batch_spec.max_batch_size for t in c.app.tasks.values()
                 if getattr(t, "_batch_spec", None) is not None])
            logger.info("celery_batched: queue %r is a quorum queue: RabbitMQ applies prefetch "
                        "per consumer, set once before consuming: %d (Celery's %d + batching's "
                        "%d)", quorum, count, base, share)
        self.prefetch.apply()
        if first:  # what start-up made since: the connection, the pool, the consumer's state
            tuning.freeze_startup_heap(c.app)

    def _direct_receiver(self, payload: dict[str, Any]) -> Any:
        """The batched task's own entry for a message the bulk fetch popped (or None)."""
        headers = payload.get("headers")
        if not headers:
            return None
        strategy = self.consumer.strategies.get(headers.get("task"))
        return getattr(strategy, "receive_direct", None)

    def slots(self) -> int:
        """How many batches the pool runs at once, now (prefork processes with ``--autoscale``
        included, threads, or 1 for solo)."""
        pool = self.consumer.pool
        return int(getattr(pool, "num_processes", None) or getattr(pool, "limit", None) or 1)

    def _disable_prefetch(self, channel_qos: Any) -> None:
        """``worker_disable_prefetch``: Celery fetches only while a pool process is free,
        counting reserved requests -- buffered items are reserved, so batches would stay at one
        item. This replaces Celery's rule (``celery.worker.consumer.tasks.Tasks.start``) with the
        same rule for everything but batching's own items, and batching's: fetch while a pool
        process is free."""
        reserved = worker.reserved_requests
        controller = self.consumer.controller

        def may_fetch() -> bool:
            assert self.dispatcher is not None and self.prefetch is not None
            if self.dispatcher.pool_busy():
                return False
            limit = getattr(controller, "max_concurrency", None) or self.slots()
            return len(reserved()) - self.prefetch.held() < limit

        worker.replace_can_consume(channel_qos, may_fetch)

    def buffer_for(self, task: Any) -> BatchBuffer:
        buffer = self.buffers.get(task.name)
        if buffer is None:
            assert self.prefetch is not None and self.dispatcher is not None
            spec = task._batch_spec
            timer = self.consumer.timer
            if self.consumer.hub is None:  # timer callbacks come from the timer's own thread
                timer = _LockedTimer(timer, self.thread_lock)
            latency = None
            if spec.max_latency_ms is not None:
                latency = self.latency_models.for_task(task.name, spec.max_latency_ms,
                                                       spec.max_batch_size)
            buffer = self.buffers[task.name] = BatchBuffer(
                spec, timer, self.prefetch.credit_for(spec.max_batch_size),
                self.dispatcher, pool_busy=self.dispatcher.pool_busy, latency=latency)
        return buffer

    def stop(self, c: Any) -> None:
        """Hand every buffered (not yet running) message back to the broker."""
        handed_back = 0
        for buffer in self.buffers.values():
            batch = buffer.take_all()
            for item in batch:
                item.reject(requeue=True)
                worker.task_ready(item)
            buffer.credit.release(len(batch))
            handed_back += len(batch)
        self.buffers = {}
        if handed_back:
            logger.info("celery_batched: handed %d buffered message(s) back to the broker",
                        handed_back)

    def shutdown(self, c: Any) -> None:
        self.stop(c)
        if self.thread is not None and not self.thread.has_loop:
            # No event loop whose close would do it: the pool's last callbacks, the results they
            # hand to the writer, the writer's completions, then the acks those queued.
            self.thread.settle(self._drain_writer, SHUTDOWN_DRAIN_S)
            c.perform_pending_operations()
            self.thread.close()
        if self.writer is not None:
            self.writer.stop()
        if self.metrics is not None:
            self.metrics.stop()
        tuning.restore(self._previous_switch, self._froze)
        self._previous_switch, self._froze = None, False

    def _drain_writer(self, timeout: float) -> bool:
        """Wait (at most ``timeout`` s) until the writer stored what it was given and handed the
        completions to the consumer's thread; True if it did."""
        if self.writer is None or self.writer.drain(timeout):
            return True
        logger.error("celery_batched: %d batch(es) still waiting for their results to be "
                     "stored after %ss; their messages stay unacknowledged and will be "
                     "delivered again", self.writer.pending, SHUTDOWN_DRAIN_S)
        return False

    def _flush_due(self) -> None:
        for buffer in list(self.buffers.values()):
            buffer.flush_if_due()

    def reconfigure(self, task: Any, changes: dict[str, Any]) -> dict[str, Any]:
        """``configure_batching``: new options for ``task`` on this worker, from now on."""
        with self.thread_lock:
            previous = task._batch_spec
            spec = previous.reconfigured(changes)
            task._batch_spec = spec  # this process only: the pool's copy binds, never buffers
            buffer = self.buffers.get(task.name)
            if buffer is not None:
                buffer.reconfigure(spec)
            latency = self.latency_models.by_task.get(task.name)  # shared by its buffers
            if latency is not None and spec.max_latency_ms is not None:
                latency.reconfigure(spec.max_latency_ms, spec.max_batch_size)
        logger.info("celery_batched: %s reconfigured: %s", task.name,
                    " ".join(f"{k}={v}" for k, v in sorted(changes.items())))
        static = self.prefetch.static if self.prefetch is not None else None
        if static is not None and spec.max_batch_size > previous.max_batch_size:
            logger.warning("celery_batched: %s max_batch_size=%d can't raise the prefetch count: "
                           "RabbitMQ applies it per consumer (quorum queue), set once before "
                           "consuming (%d) until the consumer reconnects; batches may not fill",
                           task.name, spec.max_batch_size, static)
        return spec.settings()

    def _buffered(self) -> dict[str, int]:
        return {name: len(buffer) for name, buffer in list(self.buffers.items())}

    def info(self, c: Any) -> dict[str, Any]:
        return {"batching": self.stats()}

    def stats(self) -> dict[str, Any]:
        out = {}
        for name in {**self.records.by_task, **self.buffers}:
            record = self.records.by_task.get(name) or TaskRecord()
            buffer = self.buffers.get(name)
            task = self.consumer.app.tasks.get(name)
            out[name] = {
                **record.snapshot(),
                "buffered": len(buffer) if buffer else 0,
                "held": buffer.credit.held if buffer else 0,
                "settings": task._batch_spec.settings() if task is not None else None,
            }
            if buffer is not None and buffer.spec.policy is not None:
                out[name]["open_keys"] = buffer.open_keys
            model = self.latency_models.by_task.get(name)
            if model is not None:
                out[name]["latency"] = model.snapshot()
        return out

    @classmethod
    def attach_late(cls, c: Any) -> BatchingStep | None:
        """Add batching to a consumer built before any ``BatchedTask`` was bound to its app;
        None where it can't be (not a Celery consumer, or one that is stopping).

        The case is Celery's own testing pattern: ``celery.contrib.pytest``'s ``celery_worker``
        (or ``start_worker``) runs, a batched task is defined in the test, and
        ``celery_worker.reload()`` builds its strategy -- on the test's thread -- for a consumer
        whose blueprint has no batching step. The step joins ``c.steps`` just before the event
        loop's step, where a blueprint built with it has it, so the worker's stop and shutdown
        and a reconnect's restart reach it like any other step. ``start`` must run on the
        consumer's thread (its ``ConsumerThread`` is bound to that thread; the qos, the channel
        and the event loop are that thread's). A blueprint that is still starting starts the
        step in order. One already in its event loop can't: the step then starts on the first
        entry into its ``thread_lock``, which before the step has started only the consumer's
        thread makes (a batched task's message handler, a remote-control command).
        """
        blueprint = getattr(c, "blueprint", None)
        steps = getattr(c, "steps", None)
        if (blueprint is None or not isinstance(steps, list)
                or blueprint.state in (bootsteps.CLOSE, bootsteps.TERMINATE)):
            return None
        current = getattr(c, "batching", None)
        if isinstance(current, cls):
            return current
        at = len(steps) - 1 if steps and getattr(steps[-1], "last", False) else len(steps)
        running = blueprint.state == bootsteps.RUN and blueprint.started == len(steps)
        step = cls(c)
        if running:
            step.thread_lock = _StartOnEntry(step, c, step.thread_lock)
            # Blueprint.start is iterating the old list (it is in the event loop's step): a new
            # list keeps it from running that step again when the loop returns.
            c.steps = [*steps[:at], step, *steps[at:]]
            blueprint.started += 1  # Blueprint.stop stops the steps only when all started
        else:
            steps.insert(at, step)
        blueprint.steps.setdefault(step.name, step)
        logger.info("celery_batched: batching attached to the running consumer (its blueprint "
                    "was built before a BatchedTask was bound to the app)")
        return step


class _LockedTimer:
    """A timer whose callbacks take the consumer's lock (transports without an event loop)."""

    def __init__(self, timer: Any, lock: Any) -> None:
        self.timer, self.lock = timer, lock

    def call_after(self, secs: float, fun: Any, args: tuple[Any, ...] = ()) -> Any:
        def locked(*a: Any) -> None:
            with self.lock:
                fun(*a)
        return self.timer.call_after(secs, locked, args)


class _StartOnEntry:
    """The consumer's lock of a step attached to a running consumer (``attach_late``): the
    first entry, on the consumer's thread, starts the step, then every entry takes the lock."""

    def __init__(self, step: BatchingStep, consumer: Any, lock: Any) -> None:
        self.step, self.consumer, self.lock = step, consumer, lock

    def __enter__(self) -> Any:
        if self.step.thread is None:
            self.step.start(self.consumer)
        return self.lock.__enter__()

    def __exit__(self, *exc: Any) -> Any:
        return self.lock.__exit__(*exc)
