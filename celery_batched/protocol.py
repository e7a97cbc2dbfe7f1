"""The contract between the worker's main process and its pool: what a batch carries on the
way in, the one reply per batch on the way out, and what the worker path reads of a task.

The consumer sends each message as it arrived -- headers and the still-encoded body -- so the
consumer never decodes a body; the pool process decodes, calls the function and answers with an
``Outcome`` per item. Successes the worker's main process can store come back as values
(``Outcome.STORE``); everything else is recorded in the pool, as Celery's tracer would.

The worker side takes a ``BatchedTaskLike`` rather than importing ``task.BatchedTask``:
``task.py`` (what users import) sits above the worker path and imports from it, never the other
way round.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any, NamedTuple, Protocol

from celery import Celery

from .spec import BatchSpec

#: One message: headers, body (raw bytes, or an already decoded ``(args, kwargs, embed)``
#: tuple), content type, content encoding, and its delivery details
#: ``(exchange, routing_key, priority, redelivered, reply_to, correlation_id)``.
WireItem = tuple[dict[str, Any], Any, "str | None", "str | None", tuple[Any, ...]]


class Outcome(IntEnum):
    """What became of one item, as the pool answers it (one byte per item) and as the worker's
    main process settles it."""

    #: Succeeded; the worker's main process stores the value (``BatchReply.values``).
    STORE = 0
    #: Succeeded and its result recorded (stored, or ``ignore_result``): acknowledge.
    DONE = 1
    #: Failed; the failure is stored. ``extras[i]`` is its ``ExceptionInfo``.
    FAILED = 2
    #: Sent for a retry (the retry message carries it on). ``extras[i]`` is its ``ExceptionInfo``.
    RETRIED = 3
    #: Its outcome could not be stored (the result backend did not take the write): it must not
    #: be acknowledged, and goes back to the broker.
    UNSTORED = 4


class BatchReply(NamedTuple):
    """The pool's answer for one batch."""

    #: One ``Outcome`` per item, in item order.
    codes: bytes
    #: The ``STORE`` items' values in item order: a list, or an array with one row per item.
    values: Any
    #: Per item index: ``ExceptionInfo`` (FAILED, RETRIED), the result's repr when task events
    #: are on (DONE), the item's ``embed`` when it has errbacks (STORE), a reason (UNSTORED).
    extras: dict[int, Any]
    #: Seconds the batch took in the pool, the function call included.
    runtime: float
    #: Seconds of that spent in the function itself (``setup()`` included, when it ran).
    call_s: float
    #: Seconds of ``call_s`` spent in ``setup()`` (a class-based task's first batch per process).
    setup_s: float = 0.0
    #: Calls of the function that raised (rather than returned one outcome per item).
    raised: int = 0


class BatchedTaskLike(Protocol):
    """The attributes of a ``BatchedTask`` that the worker path reads."""

    name: str
    app: Celery
    backend: Any
    request_stack: Any
    request: Any
    acks_late: bool
    ignore_result: bool
    track_started: bool
    send_events: bool
    resultrepr_maxsize: int
    time_limit: float | None
    soft_time_limit: float | None
    rate_limit: str | float | None
    max_backlog: int | None
    isolate_failures: bool
    _batch_spec: BatchSpec

    def setup(self) -> None: ...

    def run(self, *args: Any, **kwargs: Any) -> Any: ...

    def retry(self, *args: Any, **kwargs: Any) -> Any: ...

    def apply_async(self, *args: Any, **kwargs: Any) -> Any: ...

    def on_failure(self, exc: Any, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None: ...

    def on_retry(self, exc: Any, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None: ...
