"""Prometheus metrics of a batching worker, served by its main process.

Off unless the app sets ``batching_metrics_port``; needs ``prometheus_client``
(``pip install "celery-batched[metrics]"``). Everything is observed in the worker's main process
-- flushes, batch sizes, waits, execution times, outcomes -- so a prefork pool needs no
multiprocess mode: the pool processes only run the function. One registry per worker (not the
global one), served on ``batching_metrics_addr`` (default ``127.0.0.1``; ``0.0.0.0`` in a
container) by ``prometheus_client``'s HTTP server thread.

=========================================  =========  ====================================
metric                                     type       labels
=========================================  =========  ====================================
``celery_batched_batch_size``              histogram  task
``celery_batched_buffer_wait_seconds``     histogram  task (one observation per item)
``celery_batched_batch_execution_seconds`` histogram  task (in the pool, function included)
``celery_batched_items_total``             counter    task, outcome (succeeded, failed,
                                                      retried, handed_back)
``celery_batched_flushes_total``           counter    task, reason
``celery_batched_buffered_items``          gauge      task
``celery_batched_batches_in_flight``       gauge      task
=========================================  =========  ====================================
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from ...errors import WorkerConfigurationError
from ...observers import BatchObserver, BatchOutcome

if TYPE_CHECKING:
    from ..batch import Batch

SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
WAIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
EXEC_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                60.0)


class BatchMetrics(BatchObserver):
    """The worker's batching metrics: a batch observer (``observers.py``)."""

    def __init__(self, buffered: Callable[[], dict[str, int]]) -> None:
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
        self.items = PCounter("celery_batched_items", "Items by outcome", ["task", "outcome"],
                              registry=self.registry)
        self.flushes = PCounter("celery_batched_flushes", "Flushes by reason", ["task", "reason"],
                                registry=self.registry)
        self.in_flight: Counter[str] = Counter()
        self._buffered = buffered
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

            def describe(self) -> list[Any]:
                return []

        self.registry.register(Gauges())
        self._server: Any = None

    def serve(self, port: int, addr: str) -> None:
        from prometheus_client import start_http_server

        try:
            self._server, _ = start_http_server(port, addr=addr, registry=self.registry)
        except OSError as exc:
            raise WorkerConfigurationError(
                f"batching_metrics_port={port}: can't listen on {addr}:{port} ({exc}); pick a "
                f"free port per worker (two workers on one host need two ports)") from exc

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
            self.execution.labels(name).observe(outcome.runtime_s)
        for label, n in (("succeeded", outcome.succeeded), ("failed", outcome.failed),
                         ("retried", outcome.retried), ("handed_back", outcome.handed_back)):
            if n:
                self.items.labels(name, label).inc(n)
