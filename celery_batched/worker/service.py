"""The worker's batching service: what one worker runs for its batched tasks, built by the bootstep.

What lives as long as the worker is made at the first start: the consumer-thread hand-off, the
result writer, the dispatcher, the observers. What lives as long as one broker connection is made
at every start: the buffers and the prefetch credit. When the connection is lost or the worker
stops, buffered messages are handed back to the broker (rejected with requeue) rather than run,
since their delivery tags die with the channel; running batches finish and are acknowledged when
their results are stored -- at shutdown, before the event loop closes.

Built in the order the data flows, so each callback goes straight to its owner: the completion
(acks, events), the writer (its stored batches go to the completion), the dispatcher (its free
slots go to the buffers), then per connection the buffers.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from typing import Any, ContextManager

from celery import Celery, signals
from celery.utils.log import get_logger
from celery.worker.consumer import Consumer

from .. import observers, tuning
from .._internals import worker
from .._internals.client import queue_messages
from .._internals.kombu_redis import guard_close, install_bulk_fetch
from ..errors import WorkerConfigurationError
from ..observers import Observers
from ..pool import devices
from ..protocol import BatchedTaskLike
from .buffer import BatchBuffer
from .checks import check_result_serializer, check_worker
from .completion import Completion
from .dispatch import BatchDispatcher
from .handoff import ConsumerThread
from .latency import LatencyModels
from .observe.history import BatchHistory
from .observe.metrics import BatchMetrics
from .observe.records import TaskRecord, TaskRecords
from .prefetch import PREFETCH_COUNT_MAX, Prefetch
from .writer import ResultWriter

logger = get_logger(__name__)

#: How long a stopping worker waits for running batches' results to be stored, at most.
SHUTDOWN_DRAIN_S = 60.0


class Buffers:
    """One broker connection's open buffers, one per batched task, made at its first message."""

    def __init__(self, consumer: Consumer, latency_models: LatencyModels) -> None:
        self.consumer = consumer
        self.latency_models = latency_models
        self.by_task: dict[str, BatchBuffer] = {}
        self.timer: Any = None
        self.prefetch: Prefetch | None = None
        self.dispatcher: BatchDispatcher | None = None

    def connect(self, prefetch: Prefetch, dispatcher: BatchDispatcher,
                lock: ContextManager[Any]) -> None:
        """A new connection: new credit, no buffer (the last one's were handed back)."""
        self.prefetch, self.dispatcher, self.by_task = prefetch, dispatcher, {}
        self.timer = self.consumer.timer
        if self.consumer.hub is None:  # timer callbacks come from the timer's own thread
            self.timer = _LockedTimer(self.timer, lock)

    def for_task(self, task: BatchedTaskLike) -> BatchBuffer:
        buffer = self.by_task.get(task.name)
        if buffer is None:
            assert self.prefetch is not None and self.dispatcher is not None
            spec = task._batch_spec
            latency = None
            if spec.max_latency_ms is not None:
                latency = self.latency_models.for_task(task.name, spec.max_latency_ms,
                                                       spec.max_batch_size)
            buffer = self.by_task[task.name] = BatchBuffer(
                spec, self.timer, self.prefetch.credit_for(spec.max_batch_size),
                self.dispatcher, pool_busy=self.dispatcher.pool_busy, latency=latency,
                high_first=self.consumer.connection.transport.driver_type != "redis")
        return buffer

    def flush_due(self) -> None:
        """A pool process is free: flush what waited for one."""
        for buffer in list(self.by_task.values()):
            buffer.flush_if_due()

    def hand_back(self) -> int:
        """Reject every buffered (not yet running) message with requeue; how many there were."""
        handed_back = 0
        for buffer in self.by_task.values():
            items = buffer.take_all()
            for item in items:
                item.reject(requeue=True)
                worker.task_ready(item)
            buffer.credit.release(len(items))
            handed_back += len(items)
        self.by_task = {}
        return handed_back

    def sizes(self) -> dict[str, int]:
        return {name: len(buffer) for name, buffer in list(self.by_task.items())}


class BatchingService:
    """Buffers batched tasks' messages in the consumer and flushes them to the pool."""

    def __init__(self, consumer: Consumer, pool_devices: str | None = None) -> None:
        self.consumer = consumer
        check_result_serializer(consumer.app)  # before Celery builds its result backend (banner)
        # Before the pool forks (Celery creates every step before it starts any).
        self._pinning = devices.pin_children(consumer.app, consumer.pool, pool_devices)
        #: What ``inspect batching_stats`` reports, per task.
        self.records = TaskRecords()
        #: What ``inspect batch <id>`` answers: the recent batches' items and outcomes.
        self.history = BatchHistory()
        #: What ``max_latency_ms`` learned, per task; it survives reconnects.
        self.latency_models = LatencyModels()
        #: Prometheus metrics, when ``batching_metrics_port`` is set (``observe/metrics.py``).
        self.metrics: BatchMetrics | None = None
        #: Everything told about each batch: the above and the app's ``batching_observers``.
        self.observers = Observers([])
        #: Serializes message handling with batch callbacks where there is no event loop
        #: (callbacks then come from the pool's result thread and the timer thread).
        self.thread_lock: ContextManager[Any] = (
            contextlib.nullcontext() if consumer.hub else threading.RLock())
        self.buffers = Buffers(consumer, self.latency_models)
        self.thread: ConsumerThread | None = None
        self.writer: ResultWriter | None = None
        self.dispatcher: BatchDispatcher | None = None
        self.prefetch: Prefetch | None = None
        self._previous_switch: float | None = None
        #: ``--batching-metrics-port``/``--batching-metrics-addr`` as given (the bootstep's).
        self.cli_metrics: tuple[int | None, str | None] = (None, None)
        #: The batched queues this worker consumes, for the metrics' broker backlog.
        self.queues: list[str] = []
        # Before the pool forks its processes: they start with the heap frozen too, so their
        # own freeze after setup() collects only what was made since.
        self._froze = tuning.freeze_startup_heap(consumer.app)
        tuning.set_in_worker(True)
        #: An embedded worker (celery.contrib.testing) may be shut down from another thread
        #: while its consumer is still starting: what start sets up after that is not undone.
        self._tuning_lock = threading.Lock()
        self._shut_down = False

    def start(self, c: Consumer) -> None:
        first = self.thread is None
        if self.thread is None:
            self._start_worker(c)
        else:
            self.thread.arm()
        self._connect(c)
        if first:  # what start-up made since: the connection, the pool, the consumer's state
            with self._tuning_lock:
                if not self._shut_down:
                    self._froze = tuning.freeze_startup_heap(c.app) or self._froze

    def _start_worker(self, c: Consumer) -> None:
        """What lives as long as the worker."""
        check_worker(c.app, c.connection.transport.driver_type,
                     getattr(c.controller, "max_concurrency", None) or self.slots())
        with self._tuning_lock:
            if not self._shut_down:
                self._previous_switch = tuning.shorten_switch_interval(c.app)
        thread = self.thread = ConsumerThread(c, self.thread_lock)
        port, addr = metrics_settings(c.app, *self.cli_metrics)
        if port is not None:
            self.metrics = BatchMetrics(self.buffers.sizes, self._gauges, self._backlog)
            bound = self.metrics.serve(port, addr)
            logger.info("celery_batched: Prometheus metrics at http://%s:%d/metrics", addr, bound)
        self.observers = Observers([
            self.records, self.history, self.latency_models, *([self.metrics] if self.metrics else []),
            *observers.from_config(c.app.conf.get("batching_observers"))])
        completion = Completion(c, thread.call_ack, self.observers)
        self.writer = ResultWriter(
            on_written=lambda batch, reply, written: thread.call(
                completion.finished, batch, reply, written))
        thread.drain_at_close(self._drain_writer, SHUTDOWN_DRAIN_S)
        self.dispatcher = BatchDispatcher(c, thread, completion, self.writer, self.slots,
                                          self.observers, on_slot_free=self.buffers.flush_due)

    def _connect(self, c: Consumer) -> None:
        """What lives as long as one broker connection: the buffers and the prefetch credit."""
        assert self.dispatcher is not None
        if c.task_consumer is not None:
            guard_close(c.task_consumer.channel)
            if c.app.conf.get("batching_redis_bulk_fetch", True):
                install_bulk_fetch(c.task_consumer.channel, self._direct_receiver)
        disable = bool(c.app.conf.get("worker_disable_prefetch")) and \
            c.connection.transport.driver_type == "redis"
        if c.task_consumer is not None:
            self.queues = [q.name for q in c.task_consumer.queues]
        self.prefetch = Prefetch(c.qos, self.slots, disable_prefetch=disable)
        self.buffers.connect(self.prefetch, self.dispatcher, self.thread_lock)
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

    def _direct_receiver(self, payload: dict[str, Any]) -> Callable[[Any], None] | None:
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
        dispatcher, prefetch = self.dispatcher, self.prefetch
        assert dispatcher is not None and prefetch is not None

        def may_fetch() -> bool:
            if dispatcher.pool_busy():
                return False
            limit = getattr(controller, "max_concurrency", None) or self.slots()
            return len(reserved()) - prefetch.held() < limit

        worker.replace_can_consume(channel_qos, may_fetch)

    def hand_back(self) -> None:
        """The connection is going: hand every buffered message back to the broker."""
        handed_back = self.buffers.hand_back()
        if handed_back:
            logger.info("celery_batched: handed %d buffered message(s) back to the broker",
                        handed_back)

    def shutdown(self) -> None:
        self.hand_back()
        if self.thread is not None and not self.thread.has_loop:
            # No event loop whose close would do it: the pool's last callbacks, the results they
            # hand to the writer, the writer's completions, then the acks those queued.
            self.thread.settle(self._drain_writer, SHUTDOWN_DRAIN_S)
            self.consumer.perform_pending_operations()
            self.thread.close()
        if self.writer is not None:
            self.writer.stop()
        if self.metrics is not None:
            self.metrics.stop()
        if self._pinning is not None:
            signals.worker_process_init.disconnect(self._pinning)
        with self._tuning_lock:
            self._shut_down = True
            tuning.set_in_worker(False)
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

    def reconfigure(self, task: BatchedTaskLike, changes: dict[str, Any]) -> dict[str, Any]:
        """``configure_batching``: new options for ``task`` on this worker, from now on."""
        with self.thread_lock:
            previous = task._batch_spec
            spec = previous.reconfigured(changes)
            task._batch_spec = spec  # this process only: the pool's copy binds, never buffers
            buffer = self.buffers.by_task.get(task.name)
            if buffer is not None:
                buffer.reconfigure(spec)
            latency = self.latency_models.by_task.get(task.name)  # shared by its buffers
            if latency is not None and spec.max_latency_ms is not None:
                latency.reconfigure(spec.max_latency_ms, spec.max_batch_size)
        logger.info("celery_batched: %s reconfigured: %s", task.name,
                    " ".join(f"{k}={v}" for k, v in sorted(changes.items())))
        warnings = []
        static = self.prefetch.static if self.prefetch is not None else None
        if static is not None and spec.max_batch_size > previous.max_batch_size:
            warnings.append(
                f"{task.name} max_batch_size={spec.max_batch_size} can't raise the prefetch "
                f"count: RabbitMQ applies it per consumer (quorum queue), set once before "
                f"consuming ({static}) until the consumer reconnects; batches may not fill")
        holds = spec.max_batch_size * (self.slots() + 2)
        if holds > PREFETCH_COUNT_MAX:
            warnings.append(
                f"{task.name} max_batch_size={spec.max_batch_size}: this worker would hold "
                f"{holds} messages to fill its batches ({self.slots()} pool process(es) + 2 "
                f"batches), but a broker's prefetch count stops at {PREFETCH_COUNT_MAX}: "
                f"batches will not fill; keep max_batch_size <= "
                f"{PREFETCH_COUNT_MAX // (self.slots() + 2)}")
        for warning in warnings:
            logger.warning("celery_batched: %s", warning)
        settings = spec.settings()
        if warnings:
            settings["warnings"] = warnings
        return settings

    def _gauges(self) -> dict[str, dict[str, float | None]]:
        """Per batched task, now: items held (buffered, running or being stored), and the
        settings in force (``configure_batching`` changes show)."""
        buffers = self.buffers.by_task
        out: dict[str, dict[str, float | None]] = {}
        for name, task in list(self.consumer.app.tasks.items()):
            spec = getattr(task, "_batch_spec", None)
            if spec is None:
                continue
            buffer = buffers.get(name)
            out[name] = {"held_items": buffer.credit.held if buffer is not None else 0,
                         "max_batch_size": spec.max_batch_size,
                         "wait_seconds": spec.wait_s if spec.max_latency_ms is None else None,
                         "max_latency_seconds": (None if spec.max_latency_ms is None
                                                 else spec.max_latency_ms / 1000.0)}
        return out

    def _backlog(self) -> dict[str, int]:
        """Messages waiting in the broker per consumed queue (not yet fetched by any worker), read
        as producers' ``max_backlog`` reads them (``queue_messages``), on a connection of its own
        (the scrape's thread must not use the consumer's)."""
        out: dict[str, int] = {}
        with self.consumer.app.connection_for_read(connect_timeout=2) as conn:
            conn.ensure_connection(max_retries=1)
            channel = conn.channel()
            try:
                for name in list(self.queues):
                    try:
                        out[name] = queue_messages(channel, name)
                    except conn.channel_errors:  # no such queue (Redis: an empty one): none wait
                        out[name] = 0
                        channel.close()
                        channel = conn.channel()  # AMQP closes a channel on a failed declare
            finally:
                channel.close()
        return out

    def stats(self) -> dict[str, dict[str, Any]]:
        """``inspect batching_stats``: per task, its record, what waits, the settings in force."""
        out: dict[str, dict[str, Any]] = {}
        buffers = self.buffers.by_task
        for name in {**self.records.by_task, **buffers}:
            record = self.records.by_task.get(name) or TaskRecord()
            buffer = buffers.get(name)
            task = self.consumer.app.tasks.get(name)
            out[name] = {
                **record.snapshot(),
                "buffered": len(buffer) if buffer else 0,
                "held": buffer.credit.held if buffer is not None else 0,
                "settings": task._batch_spec.settings() if task is not None else None,
            }
            if buffer is not None and buffer.spec.policy is not None:
                out[name]["open_keys"] = buffer.open_keys
            model = self.latency_models.by_task.get(name)
            if model is not None:
                out[name]["latency"] = model.snapshot()
        return out


def metrics_settings(app: Celery, cli_port: int | None,
                     cli_addr: str | None) -> tuple[int | None, str]:
    """Where ``/metrics`` is served: the worker's command line, else the environment
    (``CELERY_BATCHED_METRICS_PORT``/``_ADDR``), else the app's config; port None = off, 0 = any
    free port."""
    port: Any = cli_port
    if port is None:
        port = os.environ.get("CELERY_BATCHED_METRICS_PORT") or app.conf.get(
            "batching_metrics_port")
    addr = (cli_addr or os.environ.get("CELERY_BATCHED_METRICS_ADDR")
            or app.conf.get("batching_metrics_addr") or "127.0.0.1")
    if port is None or port == "":
        return None, addr
    try:
        number = int(port)
    except (TypeError, ValueError):
        number = -1
    if not 0 <= number <= 65535:
        raise WorkerConfigurationError(
            f"batching metrics port {port!r} is not a port number (0-65535; 0 = any free port); "
            f"fix --batching-metrics-port, CELERY_BATCHED_METRICS_PORT or batching_metrics_port")
    return number, addr


class _LockedTimer:
    """A timer whose callbacks take the consumer's lock (transports without an event loop)."""

    def __init__(self, timer: Any, lock: ContextManager[Any]) -> None:
        self.timer, self.lock = timer, lock

    def call_after(self, secs: float, fun: Callable[..., Any], args: tuple[Any, ...] = ()) -> Any:
        def locked(*a: Any) -> None:
            with self.lock:
                fun(*a)
        return self.timer.call_after(secs, locked, args)
