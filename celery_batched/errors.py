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


class ItemPolicyError(CeleryBatchedError):
    """The task's ``batch_key`` or ``batch_cost`` function raised for one item, or returned
    something unusable (an unhashable key, a cost that is not a number >= 0).

    Only that item fails, with this error naming the function and the item; it never runs.
    """


class ItemDecodeError(CeleryBatchedError):
    """One item's message body could not be decoded (malformed, or not the declared content type).

    Only that item fails, with this error naming the task, the item and the content type; the
    rest of its batch runs.
    """


class ItemResultEncodeError(CeleryBatchedError):
    """One item's result could not be encoded by the result serializer (say, a set under JSON).

    Only that item fails; the other results of its batch are stored.
    """


class ItemFailureStoreError(CeleryBatchedError):
    """One item failed with an exception the result backend could not store as it is (too
    large, say); this error, naming the original exception, is stored in its place."""


class BatchSetupError(CeleryBatchedError):
    """``setup()`` of a class-based batched task raised; the batch's items fail with this error.

    ``setup()`` is tried again before the next batch of that worker process.
    """


class BatchingNotInstalledError(CeleryBatchedError):
    """A batched task's strategy was built for a consumer that has no batching bootstep and
    can't be given one.

    A consumer whose blueprint was built before any ``BatchedTask`` was bound to the app gets
    the step attached when a batched task's strategy is built (Celery's testing pattern: a task
    defined in the test, then ``celery_worker.reload()``; ``BatchingStep.attach_late``). This is
    raised only where that can't be done: the consumer is stopping, or it is not a Celery
    consumer. Add ``app.steps['consumer'].add(celery_batched.BatchingStep)`` next to the app's
    definition, before the worker starts.
    """


class WorkerConfigurationError(CeleryBatchedError):
    """A worker that would run batched tasks is configured so that items would be lost or stuck.

    Raised when the worker starts (it exits with the message), e.g. a result serializer whose
    library is missing, or a Redis ``visibility_timeout`` shorter than a batch can take.
    The message says what to install or change.
    """


class BulkPublishError(CeleryBatchedError):
    """Bulk submit broke off (the broker connection failed mid-way).

    ``sent`` messages were surely published, the next ``uncertain`` may or may not have been,
    the rest were not. The message says so; retrying the uncertain ones may run them twice.
    """

    def __init__(self, message: str, sent: int = 0, uncertain: int = 0) -> None:
        super().__init__(message)
        self.sent = sent
        self.uncertain = uncertain

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (str(self), self.sent, self.uncertain))


class Backpressure(CeleryBatchedError):
    """A batched task's queue already holds ``max_backlog`` messages or more: the item was not
    sent. Shed the load (HTTP 429/503 with ``Retry-After: retry_after``) or retry later.

    ``backlog``: messages waiting in the broker queue when last read (at most half a second
    ago); ``retry_after``: seconds until the backlog is expected under the bound at the drain
    rate measured from this process's reads, or None before a drain has been measured.
    """

    def __init__(self, message: str, task: str = "", queue: str = "", backlog: int = 0,
                 max_backlog: int = 0, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.task, self.queue, self.backlog = task, queue, backlog
        self.max_backlog, self.retry_after = max_backlog, retry_after

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (str(self), self.task, self.queue, self.backlog, self.max_backlog,
                             self.retry_after))
