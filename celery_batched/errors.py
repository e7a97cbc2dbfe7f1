"""The exceptions celery_batched raises.

Every error derives from :class:`CeleryBatchedError`, so ``except CeleryBatchedError`` catches
everything this library raises on its own account. Errors that travel through the result backend
(the per-item ones) carry only a message string, so that they pickle and JSON-encode like any
Celery exception and read well in ``AsyncResult.traceback`` and in Flower.
"""

from __future__ import annotations


class CeleryBatchedError(Exception):
    """Base class of every exception raised by celery_batched."""


class BatchedTaskDefinitionError(CeleryBatchedError, TypeError):
    """Raised when a batched task is defined: its options or its signature can't work.

    A ``TypeError`` too, since that is what Python raises for a bad decorator argument.
    """


class BatchedTaskOptionError(BatchedTaskDefinitionError, ValueError):
    """Raised when ``max_batch_size`` or ``wait_ms`` (or another batching option) is out of range."""


class ItemArgumentsError(CeleryBatchedError):
    """An item's arguments don't fit the batched function's parameters.

    Only that item fails; the rest of its batch runs. Raised in the worker before the batch is
    called, and by ``.delay()``/``.apply_async()`` on the caller's side when Celery's argument
    checking (``task.typing``) is on.
    """


class BatchResultError(CeleryBatchedError):
    """The batched function returned something that can't be split into one result per item.

    Every item of that batch fails with this error: it names the task and what was returned.
    """


class ItemResultEncodeError(CeleryBatchedError):
    """One item's result could not be encoded by the result serializer (say, a set under JSON).

    Only that item fails; the other results of its batch are stored.
    """


class BatchSetupError(CeleryBatchedError):
    """``setup()`` of a class-based batched task raised; the batch's items fail with this error.

    ``setup()`` is tried again before the next batch of that worker process.
    """


class BatchingNotInstalledError(CeleryBatchedError):
    """A worker received a batched task's message but its consumer has no batching bootstep.

    This happens when the app's consumer blueprint was built before any ``BatchedTask`` was
    bound to the app. Add ``app.steps['consumer'].add(celery_batched.BatchingStep)`` next to
    the app's definition.
    """
