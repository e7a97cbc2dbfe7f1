"""celery_batched: dynamic batching for Celery tasks.

>>> @app.task(base=BatchedTask, max_batch_size=64, wait_ms=20)
... def embed(texts: list[str]) -> list[list[float]]:
...     return model.encode(texts).tolist()
>>> embed.delay("one sentence").get()   # this item's own vector
"""

from __future__ import annotations

from ._internals.events import register_batch_fields as _register_batch_fields
from .bootstep import BatchingStep
from .errors import (BatchedTaskDefinitionError, BatchedTaskOptionError, BatchingNotInstalledError,
                     BatchResultError, BatchSetupError, CeleryBatchedError, ItemArgumentsError,
                     ItemPolicyError, ItemResultEncodeError)
from .outcomes import RetryItem
from .stats import batching_stats
from .task import BatchedTask

__all__ = [
    "BatchedTask",
    "BatchingStep",
    "RetryItem",
    "batching_stats",
    "CeleryBatchedError",
    "BatchedTaskDefinitionError",
    "BatchedTaskOptionError",
    "BatchingNotInstalledError",
    "BatchResultError",
    "BatchSetupError",
    "ItemArgumentsError",
    "ItemPolicyError",
    "ItemResultEncodeError",
]
__version__ = "0.1.0"

# Flower and `celery events` (celery.events.state) list the batch fields of each item's events.
_register_batch_fields()
