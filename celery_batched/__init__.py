"""celery_batched: dynamic batching for Celery tasks.

>>> @app.task(base=BatchedTask, max_batch_size=64, wait_ms=20)
... def embed(texts: list[str]) -> list[list[float]]:
...     return model.encode(texts).tolist()
>>> embed.delay("one sentence").get()   # this item's own vector
"""

from __future__ import annotations

from ._internals.events import register_batch_fields as _register_batch_fields
from .client.stats import batching_stats
from .errors import (
                     Backpressure,
                     BatchedTaskDefinitionError,
                     BatchedTaskOptionError,
                     BatchingNotInstalledError,
                     BatchResultError,
                     BatchSetupError,
                     CeleryBatchedError,
                     ItemArgumentsError,
                     ItemFailureStoreError,
                     ItemPolicyError,
                     ItemResultEncodeError,
                     WorkerConfigurationError,
)
from .observers import BatchObserver, BatchOutcome
from .retry import RetryItem
from .task import BatchedTask, install
from .worker.bootstep import BatchingStep
from .worker.buffer import FlushReason

__all__ = [
    "BatchedTask",
    "BatchingStep",
    "install",
    "RetryItem",
    "batching_stats",
    "BatchObserver",
    "BatchOutcome",
    "FlushReason",
    "CeleryBatchedError",
    "Backpressure",
    "BatchedTaskDefinitionError",
    "BatchedTaskOptionError",
    "BatchingNotInstalledError",
    "BatchResultError",
    "BatchSetupError",
    "ItemArgumentsError",
    "ItemFailureStoreError",
    "ItemPolicyError",
    "ItemResultEncodeError",
    "WorkerConfigurationError",
]
__version__ = "0.1.0"

# Flower and `celery events` (celery.events.state) list the batch fields of each item's events.
_register_batch_fields()
