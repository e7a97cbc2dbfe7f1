"""``BatchedTask``: the Celery task base class users put on a list function."""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

from celery import Celery, Task

from ._internals.trace import autoretry
from .client import backlog
from .client.submit import ItemResults, starmap_items
from .encoding import plain
from .pool.execution import call_batch
from .retry import RetryItem
from .spec import DEFAULTS, BatchSpec, check_max_backlog
from .worker.bootstep import BatchingStep, add_worker_options

#: ``apply_async(max_backlog=...)`` not given: the task's own ``max_backlog``.
_TASK_DEFAULT: Any = object()


class BatchedTask(Task):
    """A Celery task whose function takes lists and runs once per batch of messages.

    Callers send single items (``task.delay(x, y)``); a worker buffers them and calls the
    function with one list per parameter as soon as ``max_batch_size`` items are buffered or
    ``wait_ms`` milliseconds have passed since the first -- whichever comes first. The function
    returns a list with one result per item; each item keeps its own task id, state and result.

    Class-based tasks subclass this, implement ``run(self, xs, ...)`` over lists and may
    override :meth:`setup`, which runs once per worker process before its first batch.
    The batching options' defaults, meanings and checks are ``spec.OPTIONS``.
    """

    #: Most items in one call of the function (>= 1).
    max_batch_size: ClassVar[int] = DEFAULTS["max_batch_size"]
    #: Longest wait, in milliseconds, from the first buffered item to the call (>= 0).
    wait_ms: ClassVar[float] = DEFAULTS["wait_ms"]
    #: When the whole call raises, re-run the batch split in halves to isolate the failing items.
    isolate_failures: ClassVar[bool] = DEFAULTS["isolate_failures"]
    #: Items with different keys never share a batch: a parameter's name, or a function called
    #: with one item's arguments (e.g. ``lambda text: min(len(text) // 64, 7)``).
    batch_key: ClassVar[Any] = DEFAULTS["batch_key"]
    #: At most this many keys have items waiting; a new key flushes the oldest waiting batch.
    max_open_keys: ClassVar[int] = DEFAULTS["max_open_keys"]
    #: A function of one item's arguments giving its cost (say, its tokens) ...
    batch_cost: ClassVar[Any] = DEFAULTS["batch_cost"]
    #: ... and the most a batch may cost in total; an item costing more runs alone.
    max_batch_cost: ClassVar[float | None] = DEFAULTS["max_batch_cost"]
    #: A latency target (ms) for wait + execution, instead of a fixed ``wait_ms``.
    max_latency_ms: ClassVar[float | None] = DEFAULTS["max_latency_ms"]
    #: Exceptions on which the batch is split in halves and re-run, down to single items (the
    #: default: ``MemoryError`` and ``torch.cuda.OutOfMemoryError``); ``()`` never splits.
    oom_errors: ClassVar[Any] = DEFAULTS["oom_errors"]
    #: Producers refuse to send (``Backpressure``) while the task's queue holds this many
    #: messages; None: no bound.
    max_backlog: ClassVar[int | None] = DEFAULTS["max_backlog"]
    #: Batch sizes the function runs best at (fixed-shape engines); see ``padded_size``.
    preferred_batch_sizes: ClassVar[Any] = DEFAULTS["preferred_batch_sizes"]
    #: Items sent with a message priority at least this urgent batch apart and go first ...
    urgent_priority: ClassVar[int | None] = DEFAULTS["urgent_priority"]
    #: ... with this wait (ms) for their batch.
    urgent_wait_ms: ClassVar[float] = DEFAULTS["urgent_wait_ms"]
    #: Messages are acknowledged after their results are stored: at-least-once delivery.
    acks_late = True

    Strategy = "celery_batched.worker.strategy:batching_strategy"
    _batch_spec: ClassVar[BatchSpec]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        run = inspect.getattr_static(cls, "run")
        if run is inspect.getattr_static(Task, "run"):
            return  # an intermediate base class without a function yet
        name = cls.__dict__.get("name") or f"{cls.__module__}.{cls.__qualname__}"
        fun = run.__func__ if isinstance(run, (staticmethod, classmethod)) else run
        cls._batch_spec = BatchSpec.from_function(
            fun, skip_first=not isinstance(run, staticmethod), task_name=name,
            max_batch_size=cls.max_batch_size, wait_ms=cls.wait_ms,
            batch_key=_option(cls, "batch_key"), max_open_keys=cls.max_open_keys,
            batch_cost=_option(cls, "batch_cost"), max_batch_cost=cls.max_batch_cost,
            max_latency_ms=cls.max_latency_ms,
            wait_ms_set=any("wait_ms" in k.__dict__ for k in cls.__mro__ if k is not BatchedTask),
            oom_errors=cls.oom_errors, preferred_batch_sizes=cls.preferred_batch_sizes,
            urgent_priority=cls.urgent_priority, urgent_wait_ms=cls.urgent_wait_ms)
        cls.max_backlog = check_max_backlog(cls.max_backlog, name)
        app = cls.__dict__.get("app")
        if isinstance(app, Celery):
            _install_bootstep(app)

    @classmethod
    def on_bound(cls, app: Celery) -> None:
        _install_bootstep(app)

    def setup(self) -> None:
        """Prepare this worker process for batches (load a model, open a client). Runs once."""

    def apply_async(self, args: Any = None, kwargs: Any = None, task_id: str | None = None,
                    producer: Any = None, link: Any = None, link_error: Any = None,
                    shadow: str | None = None, max_backlog: Any = _TASK_DEFAULT,
                    **options: Any) -> Any:
        """Celery's ``apply_async``, refused with ``Backpressure`` while the queue holds
        ``max_backlog`` messages (default: the task's option; None: no bound)."""
        limit = self.max_backlog if max_backlog is _TASK_DEFAULT else max_backlog
        if limit is not None:
            backlog.check(self, 1, limit, options, args or (), kwargs)
        return super().apply_async(args, kwargs, task_id, producer, link, link_error, shadow,
                                   **options)

    def padded_size(self, n: int) -> int:
        """The preferred batch size (``preferred_batch_sizes``) to pad a call of ``n`` items
        to: the smallest that holds them, or ``n`` when none does. For the function itself::

            x = pad(texts, embed.padded_size(len(texts)))   # the engine built for that size
        """
        return self._batch_spec.padded_size(n)

    def starmap_items(self, items: Iterable[Sequence[Any] | Mapping[str, Any]],
                      **options: Any) -> ItemResults:
        """Send many items at once; a list of one ``AsyncResult`` per item, in order, whose
        ``.get()`` collects all values.

        Each item is a tuple of positional arguments or a dict of keyword arguments.
        ``options``: ``queue``, ``priority``, ``countdown``, ``eta``, ``expires``, time limits,
        ``ignore_result`` (others fall back to one ``apply_async`` per item). Items are checked
        against the function's parameters before anything is sent.
        """
        return starmap_items(self, items, **options)

    def map_items(self, values: Iterable[Any], **options: Any) -> ItemResults:
        """``starmap_items`` for a function of one parameter: one value per item."""
        return self.starmap_items(((v,) for v in values), **options)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run one item as a batch of one: eager mode, ``task.apply()`` and direct calls.

        ``task.run(xs, ys)`` calls the list function itself.
        """
        row = self._batch_spec.bind_item(args, kwargs)
        pushed = self.request_stack.top is None
        if pushed:
            self.push_request(args=args, kwargs=kwargs)
        try:
            (outcome,) = list(call_batch(self, [row]))
            outcome = plain(outcome)
            if isinstance(outcome, Exception):
                raise autoretry(self, outcome)
            if isinstance(outcome, RetryItem):
                raise self.retry(exc=outcome.exc, **outcome.retry_kwargs())
            return outcome
        finally:
            if pushed:
                self.pop_request()


def _option(cls: type, name: str) -> Any:
    """A function-valued option as given (``staticmethod`` unwrapped, never bound)."""
    value = inspect.getattr_static(cls, name)
    return value.__func__ if isinstance(value, (staticmethod, classmethod)) else value


def _install_bootstep(app: Celery) -> None:
    app.steps["consumer"].add(BatchingStep)
    add_worker_options(app)


def install(app: Celery) -> None:
    """Batching's bootstep and ``celery worker`` options on ``app``, now.

    Binding a batched task does it, but ``@app.task(base=BatchedTask)`` binds only when the app
    is finalized -- after ``celery worker`` has read its command-line options. Call this next to
    the app's definition to have ``--batching-metrics-port`` there too.
    """
    _install_bootstep(app)

