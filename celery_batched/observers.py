"""Batch observers: one interface that everything watching a worker's batches implements.

The worker's own statistics (``inspect batching_stats``), its Prometheus metrics, the latency
model of ``max_latency_ms`` and users' observers are all told the same three things about every
batch, in order, on the consumer's thread::

    class Costs(BatchObserver):
        def finished(self, batch, outcome):
            if outcome.runtime_s is not None:
                bill(batch.task.name, len(batch.items), outcome.runtime_s)

    app.conf.batching_observers = [Costs()]     # instances, classes or "module:Class" paths

Keep them quick (they run between messages); one that raises is logged and the batch goes on.
A ``batch`` is the worker's flushed batch: ``batch.id``, ``batch.task`` (the task),
``batch.items`` (each with ``.id`` and ``.headers``), ``batch.reason`` (a ``FlushReason``),
``batch.waits()`` (seconds each item waited in the buffer).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .worker.batch import Batch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchOutcome:
    """How a batch ended: its items per outcome, and how long it took in the pool."""

    succeeded: int
    failed: int
    retried: int
    #: Went back to the broker: their outcome could not be stored, or the pool refused the batch.
    handed_back: int
    #: Seconds in the pool, the function included; None where the pool lost the batch.
    runtime_s: float | None
    #: Each item's outcome in item order: ``succeeded``, ``failed``, ``retried`` or
    #: ``handed_back`` (what ``inspect batch`` answers).
    items: tuple[str, ...] = ()
    #: Seconds of ``runtime_s`` spent in ``setup()`` (a pool process's first batch).
    setup_s: float = 0.0
    #: Calls of the function that raised instead of returning a result per item.
    raised: int = 0


class BatchObserver:
    """Told about every batch a worker runs; each method is a no-op until overridden."""

    def flushed(self, batch: Batch) -> None:
        """The batch left the buffer for the pool."""

    def executed(self, batch: Batch, runtime_s: float) -> None:
        """The pool answered: the function ran (``runtime_s`` includes decoding and sorting)."""

    def finished(self, batch: Batch, outcome: BatchOutcome) -> None:
        """Every item is acknowledged, failed, retried or handed back."""


class Observers:
    """The worker's observers, called in registration order, each method only on the observers
    that override it (nothing per batch for those that don't)."""

    def __init__(self, observers: Iterable[BatchObserver]) -> None:
        self.all = list(observers)
        self._flushed = _overriding(self.all, "flushed")
        self._executed = _overriding(self.all, "executed")
        self._finished = _overriding(self.all, "finished")

    def flushed(self, batch: Batch) -> None:
        for method in self._flushed:
            _call(method, batch)

    def executed(self, batch: Batch, runtime_s: float) -> None:
        for method in self._executed:
            _call(method, batch, runtime_s)

    def finished(self, batch: Batch, outcome: BatchOutcome) -> None:
        for method in self._finished:
            _call(method, batch, outcome)


def from_config(value: Any) -> list[BatchObserver]:
    """``batching_observers``: instances, classes (made without arguments) or import paths
    (``"module:Class"`` or ``"module.Class"``)."""
    from celery.utils.imports import symbol_by_name

    from .errors import WorkerConfigurationError

    out = []
    for entry in value or ():
        obj = symbol_by_name(entry) if isinstance(entry, str) else entry
        if isinstance(obj, type):
            obj = obj()
        if not all(callable(getattr(obj, name, None))
                   for name in ("flushed", "executed", "finished")):
            raise WorkerConfigurationError(
                f"batching_observers: {entry!r} is not a batch observer; subclass "
                f"celery_batched.BatchObserver and override flushed, executed or finished")
        out.append(obj)
    return out


def _overriding(observers: list[Any], name: str) -> list[Any]:
    base = getattr(BatchObserver, name)
    return [getattr(o, name) for o in observers
            if getattr(type(o), name, None) is not base]


def _call(method: Any, *args: Any) -> None:
    try:
        method(*args)
    except Exception:
        logger.exception("celery_batched: batch observer %r raised", method)
