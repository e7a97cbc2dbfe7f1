"""Prometheus metrics of a batching worker, served by its main process.

Off unless a port is given: ``celery worker --batching-metrics-port`` (0: any free port),
``CELERY_BATCHED_METRICS_PORT`` or the app's ``batching_metrics_port`` (``service.py``); needs
``prometheus_client`` (``pip install "celery-batched[metrics]"``). Everything is observed in the
worker's main process -- flushes, batch sizes, waits, execution times, outcomes -- so a prefork
pool needs no multiprocess mode: the pool processes only run the function. One registry per
worker (not the global one), served by ``prometheus_client``'s HTTP server thread; gauges are
read when scraped. The README's Monitoring section lists every metric (a test checks it lists
what a scrape shows).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from ...errors import WorkerConfigurationError
from ...observers import BatchObserver, BatchOutcome

if TYPE_CHECKING:
    from ..batch import Batch

logger = logging.getLogger(__name__)

#: Gauges per batched task, read at each scrape: what is held, and the settings in force.
PER_TASK_GAUGES = {
    "held_items": "Items this worker holds unacknowledged: buffered, running or being stored",
    "max_batch_size": "max_batch_size in force (utilization: batch size / this)",
    "wait_seconds": "wait_ms in force, in seconds (tasks batching with wait_ms)",
    "max_latency_seconds": "max_latency_ms in force, in seconds (tasks with a latency target)",
}

SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
WAIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
EXEC_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                60.0)


class BatchMetrics(BatchObserver):
    """The worker's batching metrics: a batch observer (``observers.py``)."""

    def __init__(self, buffered: Callable[[], dict[str, int]],
                 per_task: Callable[[], dict[str, dict[str, float | None]]],
                 backlog: Callable[[], dict[str, int]]) -> None:
        try:
            from prometheus_client import CollectorRegistry, Histogram
            from prometheus_client import Counter as PCounter
            from prometheus_client.core import GaugeMetricFamily
        except ImportError as exc:
            raise WorkerConfigurationError(
                "batching_metrics_port is set but prometheus_client is not installed: "
                "pip install 'celery-batched[metrics]' (or unset batching_metrics_port)") from exc
        self.registry = CollectorRegistry(auto_describe=True)
        self.batch_size = Histogram("celery_batched_batch_size", "Items per batch", ["task"],
                                    buckets=SIZE_BUCKETS, registry=self.registry)
        self.buffer_wait = Histogram(
            "celery_batched_buffer_wait_seconds", "Time an item waited in the buffer",
            ["task"], buckets=WAIT_BUCKETS, registry=self.registry)
        self.execution = Histogram(
            "celery_batched_batch_execution_seconds",
            "Time a batch took in the pool, the function call included", ["task"],
            buckets=EXEC_BUCKETS, registry=self.registry)
        self.setup = Histogram(
            "celery_batched_setup_seconds", "Time a pool process spent in the task's setup() "
            "(not in celery_batched_batch_execution_seconds)", ["task"], buckets=EXEC_BUCKETS,
            registry=self.registry)
        self.items = PCounter("celery_batched_items", "Items by outcome", ["task", "outcome"],
                              registry=self.registry)
        self.raised = PCounter(
            "celery_batched_raised_batches", "Batches in which the function raised (for "
            "several items at once) instead of returning one outcome per item", ["task"],
            registry=self.registry)
        self.flushes = PCounter("celery_batched_flushes", "Flushes by reason", ["task", "reason"],
                                registry=self.registry)
        self.in_flight: Counter[str] = Counter()
        self._buffered = buffered
        self._per_task = per_task
        self._backlog = backlog
        metrics = self

        class Gauges:
            def collect(self) -> Iterator[Any]:
                buffered = GaugeMetricFamily("celery_batched_buffered_items",
                                             "Items waiting in the buffer", labels=["task"])
                for task, n in metrics._buffered().items():
                    buffered.add_metric([task], n)
                yield buffered
                running = GaugeMetricFamily(
                    "celery_batched_batches_in_flight",
                    "Batches sent to the pool whose items are not all acknowledged yet",
                    labels=["task"])
                for task, n in list(metrics.in_flight.items()):
                    running.add_metric([task], n)
                yield running
                yield from metrics._task_gauges()
                yield from metrics._backlog_gauge()

            def describe(self) -> list[Any]:
                return []

        self.registry.register(Gauges())
        self._server: Any = None

    def _task_gauges(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        families = {key: GaugeMetricFamily(f"celery_batched_{key}", text, labels=["task"])
                    for key, text in PER_TASK_GAUGES.items()}
        for task, values in self._per_task().items():
            for key, value in values.items():
                if value is not None:
                    families[key].add_metric([task], value)
        yield from families.values()

    def _backlog_gauge(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        try:
            backlog = self._backlog()
        except Exception as exc:  # the broker is unreachable: no value rather than a wrong one
            logger.warning("celery_batched: metrics: can't read the queues' backlog from the "
                           "broker: %s: %s", type(exc).__name__, exc)
            return
        family = GaugeMetricFamily(
            "celery_batched_queue_messages", "Messages waiting in the broker in a queue this "
            "worker consumes (not yet fetched by any worker)", labels=["queue"])
        for queue, n in backlog.items():
            family.add_metric([queue], n)
        yield family

    def serve(self, port: int, addr: str) -> int:
        """Serve ``/metrics`` on ``addr:port`` (0: any free port); the port it listens on."""
        from prometheus_client import start_http_server

        try:
            self._server, _ = start_http_server(port, addr=addr, registry=self.registry)
        except OSError as exc:
            raise WorkerConfigurationError(
                f"batching metrics port {port}: can't listen on {addr}:{port} ({exc}); pick a "
                f"free port per worker (two workers on one host need two ports), or 0 for "
                f"any free port") from exc
        return int(self._server.server_port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def flushed(self, batch: Batch) -> None:
        """A batch went to the pool."""
        name = batch.task.name
        self.in_flight[name] += 1
        self.batch_size.labels(name).observe(len(batch.items))
        self.flushes.labels(name, batch.reason).inc()
        observe = self.buffer_wait.labels(name).observe
        for wait in batch.waits():
            observe(wait)

    def finished(self, batch: Batch, outcome: BatchOutcome) -> None:
        """Every item of the batch has its outcome (``runtime_s`` None: the pool lost it)."""
        name = batch.task.name
        self.in_flight[name] -= 1
        if outcome.runtime_s is not None:
            self.execution.labels(name).observe(max(outcome.runtime_s - outcome.setup_s, 0.0))
        if outcome.setup_s:
            self.setup.labels(name).observe(outcome.setup_s)
        if outcome.raised:
            self.raised.labels(name).inc()
        for label, n in (("succeeded", outcome.succeeded), ("failed", outcome.failed),
                         ("retried", outcome.retried), ("handed_back", outcome.handed_back)):
            if n:
                self.items.labels(name, label).inc(n)
