"""The consumer bootstep: a thin shell that builds the worker's batching service.

Registered on the app's consumer blueprint as soon as a ``BatchedTask`` is bound to the app.
Celery starts it at every broker connection (after its ``Tasks`` step, so the strategies exist),
stops it when the connection goes and shuts it down with the worker; the work is the service's
(``service.py``).
"""

from __future__ import annotations

from typing import Any

import click
from celery import Celery, bootsteps
from celery.utils.log import get_logger
from celery.worker.consumer import Consumer

from .._internals import blueprint
from . import control  # noqa: F401  (registers the remote-control commands)
from .service import BatchingService

logger = get_logger(__name__)

#: ``celery worker`` options of batching (Celery's ``app.user_options["worker"]``); Celery hands
#: their values to every bootstep's ``__init__``. Each one also has an environment variable and
#: an app setting (``service.metrics_settings``): per worker on the command line, per deployment
#: in the environment, per app in the config.
WORKER_OPTIONS = (
    click.Option(["--batching-metrics-port"], type=click.IntRange(0, 65535), default=None,
                 help="Serve batching's Prometheus /metrics on this port (0: any free port, "
                      "logged at start-up). Env: CELERY_BATCHED_METRICS_PORT; app setting: "
                      "batching_metrics_port."),
    click.Option(["--batching-metrics-addr"], default=None,
                 help="Address the /metrics server listens on (default 127.0.0.1; 0.0.0.0 in "
                      "a container). Env: CELERY_BATCHED_METRICS_ADDR; app setting: "
                      "batching_metrics_addr."),
    click.Option(["--batching-pool-devices"], default=None,
                 help="Pin prefork pool process i to device i (modulo) of this comma-separated "
                      "list, as CUDA_VISIBLE_DEVICES: 0,1 runs one process per GPU, 0,0 two "
                      "processes on GPU 0. Env: CELERY_BATCHED_POOL_DEVICES; app setting: "
                      "batching_pool_devices."),
)


def add_worker_options(app: Celery) -> None:
    """Offer ``--batching-metrics-port``/``-addr`` and ``--batching-pool-devices`` on
    ``celery worker``."""
    have = {o.name for o in app.user_options["worker"]}
    for option in WORKER_OPTIONS:
        if option.name not in have:
            app.user_options["worker"].add(option)


class BatchingStep(bootsteps.StartStopStep):
    """Buffers batched tasks' messages in the consumer and flushes them to the pool."""

    name = "celery_batched.Batching"
    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, c: Consumer, batching_metrics_port: int | None = None,
                 batching_metrics_addr: str | None = None,
                 batching_pool_devices: str | None = None, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        # Celery's own consumer steps publish themselves on the consumer (c.heart, c.gossip);
        # the batched tasks' strategies and the remote-control commands find the service here.
        self.service = c.batching = BatchingService(c, pool_devices=batching_pool_devices)
        self.service.cli_metrics = (batching_metrics_port, batching_metrics_addr)

    def start(self, c: Consumer) -> None:
        self.service.start(c)

    def stop(self, c: Consumer) -> None:
        self.service.hand_back()

    def shutdown(self, c: Consumer) -> None:
        self.service.shutdown()

    def info(self, c: Consumer) -> dict[str, Any]:
        return {"batching": self.service.stats()}

    @classmethod
    def attach_late(cls, c: Consumer) -> BatchingService | None:
        """Add batching to a consumer built before any ``BatchedTask`` was bound to its app;
        None where it can't be (not a Celery consumer, or one that is stopping).

        The case is Celery's own testing pattern: ``celery.contrib.pytest``'s ``celery_worker``
        (or ``start_worker``) runs, a batched task is defined in the test, and
        ``celery_worker.reload()`` builds its strategy -- on the test's thread -- for a consumer
        whose blueprint has no batching step. ``start`` must run on the consumer's thread (the
        service's ``ConsumerThread`` is bound to it; the qos, the channel and the event loop are
        that thread's): on a consumer already in its event loop the step starts on the first
        entry into the service's ``thread_lock``, which before the step has started only the
        consumer's thread makes (a batched task's message handler, a remote-control command).
        """
        current = getattr(c, "batching", None)
        if isinstance(current, BatchingService):
            return current

        def start_on_entry(step: BatchingStep) -> None:
            service = step.service
            service.thread_lock = blueprint.StartOnEntry(
                step, c, service.thread_lock, started=lambda: service.thread is not None)

        step = blueprint.attach_step(c, cls, start_on_entry)
        if step is None:
            return None
        logger.info("celery_batched: batching attached to the running consumer (its blueprint "
                    "was built before a BatchedTask was bound to the app)")
        return step.service
