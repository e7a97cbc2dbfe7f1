"""What one pool job carries: a batch on the way in, one reply per batch on the way out.

The consumer sends each message as it arrived -- headers and the still-encoded body -- so the
consumer never decodes a body; the pool process decodes, calls the function and answers with a
code per item. Successes the worker's main process can store come back as values
(``STORE``); everything else is recorded in the pool, as Celery's tracer would.
"""

from __future__ import annotations

from typing import Any, Final, NamedTuple

#: One message: headers, body (raw bytes, or an already decoded ``(args, kwargs, embed)``
#: tuple), content type, content encoding, and its delivery details
#: ``(exchange, routing_key, priority, redelivered, reply_to, correlation_id)``.
WireItem = tuple[dict[str, Any], Any, "str | None", "str | None", tuple[Any, ...]]

#: Succeeded; the worker's main process stores the value (``BatchReply.values``).
STORE: Final = 0
#: Succeeded and already recorded by the pool process (stored, or ``ignore_result``).
DONE: Final = 1
#: Failed; the failure is stored. ``extras[i]`` is its ``ExceptionInfo``.
FAILED: Final = 2
#: Sent for a retry; the RETRY state is stored. ``extras[i]`` is its ``ExceptionInfo``.
RETRIED: Final = 3
#: Its outcome could not be stored (result backend unreachable): it must not be acknowledged.
UNSTORED: Final = 4


class BatchReply(NamedTuple):
    """The pool's answer for one batch."""

    #: One code per item, in item order.
    codes: bytes
    #: The ``STORE`` items' values in item order: a list, or an array with one row per item.
    values: Any
    #: Per item index: ``ExceptionInfo`` (FAILED, RETRIED), the result's repr when task events
    #: are on (DONE), the item's ``embed`` when it has errbacks (STORE), a reason (UNSTORED).
    extras: dict[int, Any]
    #: Seconds the batch took in the pool, the function call included.
    runtime: float
    #: Seconds of that spent in the function itself.
    call_s: float
