"""One buffered message of a batched task, as lean as the hot path allows.

A Celery ``Request`` per message decodes the body, copies the headers and builds a dozen
attributes the batch path never reads. ``Item`` keeps the message and its headers, stands in
for a ``Request`` in the worker's state (``inspect reserved/active``, ``query_task``,
``revoke --terminate``), and builds the real ``Request`` only where Celery's own handling of one
request is wanted: failures, time limits, revokes, ETA, ``task_received`` receivers.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from celery.utils.log import get_logger
from celery.worker.state import revoked as revoked_tasks

from .._internals import trace, worker
from ..protocol import BatchedTaskLike, WireItem

logger = get_logger(__name__)


@dataclass(frozen=True)
class ItemSource:
    """What every item of one batched task shares on one connection."""

    task: BatchedTaskLike
    #: Builds the Celery ``Request`` of an item (``create_request_cls``'s class, bound).
    build_request: Callable[[Item], Any]
    connection_errors: tuple[type[BaseException], ...]


class Item:
    """A message in a batched task's buffer (or batch), with a ``Request``'s identity."""

    __slots__ = ("message", "id", "headers", "source", "_request", "time_start", "worker_pid",
                 "eventer", "buffered_at", "_terminate_on_accept", "payload", "error",
                 "__weakref__")

    def __init__(self, message: Any, headers: dict[str, Any], source: ItemSource,
                 request: Any = None) -> None:
        self.message = message
        self.headers = headers
        self.id: str = headers["id"]
        self.source = source
        self._request = request
        self.time_start: float | None = None
        self.worker_pid: int | None = None
        self.eventer: Any = None
        self.buffered_at = time.monotonic()
        self._terminate_on_accept: tuple[Any, Any] | None = None
        #: ``(args, kwargs, embed)`` when the consumer decoded the body (``batch_key``/``batch_cost``).
        self.payload: tuple[Any, ...] | None = None
        #: Why this item fails without running (its key or cost could not be computed).
        self.error: BaseException | None = None

    @property
    def task(self) -> BatchedTaskLike:
        return self.source.task

    @property
    def name(self) -> str:
        return self.source.task.name

    @property
    def acknowledged(self) -> bool:
        return bool(self.message.acknowledged)

    @property
    def store_errors(self) -> bool:
        return self.request().store_errors

    def request(self) -> Any:
        """The Celery ``Request`` of this message, built on first use."""
        req = self._request
        if req is None:
            req = self._request = self.source.build_request(self)
        req.acknowledged = self.message.acknowledged
        req.time_start, req.worker_pid = self.time_start, self.worker_pid
        return req

    def wire(self) -> WireItem:
        """What the pool needs of this message (``protocol.WireItem``)."""
        req, message = self._request, self.message
        body = message.body
        content_type, content_encoding = message.content_type, message.content_encoding
        if self.payload is not None:  # decoded by the consumer for its key or cost
            body, content_type, content_encoding = self.payload, None, None
        elif req is not None and req._decoded:  # built from a legacy message: decoded already
            body, content_type, content_encoding = req._payload, None, None
        return (self.headers, body, content_type, content_encoding,
                worker.delivery_details(message))

    def revoked(self) -> bool:
        """Whether this item was revoked or has expired; if so it is marked REVOKED and acked
        (``Request.revoked``). Cheap unless there is something to check.

        Also True when its REVOKED state could not be stored (the result backend is down):
        then it goes back to the broker, unacknowledged, and the check runs again on its
        next delivery -- acknowledging it would leave it PENDING forever.
        """
        headers = self.headers
        if (self.id in revoked_tasks or headers.get("expires")
                or (headers.get("stamped_headers") and worker.revoked_stamps())):
            try:
                revoked = self.request().revoked()
            except Exception as exc:
                if trace.is_outage(exc, self.task.backend):
                    logger.error("%s: revoked or expired, but its state could not be stored "
                                 "(%s: %s); handed back to the broker", self.humaninfo(),
                                 type(exc).__name__, exc)
                else:
                    logger.exception("%s: checking whether it was revoked raised; handed back "
                                     "to the broker", self.humaninfo())
                self.reject(requeue=True)
                worker.task_ready(self)
                return True
            if revoked:
                worker.task_ready(self)
                return True
        return False

    def acknowledge(self) -> None:
        """Acknowledge the message, on the consumer's thread (``Request.acknowledge``)."""
        if not self.message.acknowledged:
            self.message.ack_log_error(logger, self.source.connection_errors)

    def reject(self, requeue: bool = False) -> None:
        """Reject the message, on the consumer's thread (``Request.reject``)."""
        if not self.message.acknowledged:
            self.message.reject_log_error(logger, self.source.connection_errors, requeue=requeue)

    def info(self, safe: bool = False) -> dict[str, Any]:
        """``Request.info``, for ``inspect reserved/active`` and ``query_task``."""
        return self.request().info(safe=safe)

    def on_accepted(self, pid: int, time_accepted: float) -> None:
        """The batch started in process ``pid`` (monotonic ``time_accepted``)."""
        self.worker_pid = pid
        self.time_start = time.time() - (time.monotonic() - time_accepted)
        if self._terminate_on_accept is not None:
            self.terminate(*self._terminate_on_accept)

    def terminate(self, pool: Any, signal: Any = None) -> None:
        """``revoke(terminate=True)``: mirrors ``Request.terminate``. The process runs the
        whole batch, so terminating it ends every item of that batch (README: known limits)."""
        if self.time_start:
            req = self.request()
            req.terminate(pool, signal)
            worker.task_ready(self)
        else:
            self._terminate_on_accept = (pool, signal)

    def cancel(self, pool: Any, signal: Any = None, emit_retry: bool = True) -> None:
        """Mirrors ``Request.cancel`` (cancel long-running tasks on connection loss)."""
        if self.time_start:
            self.request().cancel(pool, signal, emit_retry=emit_retry)
            worker.task_ready(self)

    def humaninfo(self) -> str:
        return f"{self.name}[{self.id}]"

    def __repr__(self) -> str:
        return f"<Item {self.humaninfo()}>"

