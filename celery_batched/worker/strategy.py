"""Message -> buffer: the consumer-side strategy of batched tasks.

Celery calls a task's *strategy* for every message of that task. Celery's default strategy
(``celery.worker.strategy.default``) decodes the body and builds a ``Request`` per message; for a
batched task that was a third of the consumer's time. This one puts each protocol-2 message into
the buffer as an :class:`~celery_batched.worker.item.Item` -- headers and the still-encoded body
-- and keeps what users see: the revoke and expiry checks, the ``task_received`` signal, the
``task-received`` event, the accept-content check, ETA handling. A ``Request`` is built only for
ETA items, legacy (protocol 1) messages and ``task_received`` receivers, which expect one.
Rate limits (token buckets per message) are refused for batched tasks: see ``control.py``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import Celery, signals
from celery.app import trace as _app_trace
from celery.exceptions import InvalidTaskError
from celery.utils.imports import symbol_by_name
from celery.utils.log import get_logger
from celery.utils.time import timezone
from celery.worker import state as worker_state
from celery.worker.request import create_request_cls
from celery.worker.strategy import hybrid_to_proto2, proto1_to_proto2
from kombu.asynchronous.timer import to_timestamp
from kombu.exceptions import ContentDisallowed, DecodeError

from .._internals import trace, worker
from ..errors import BatchingNotInstalledError, ItemPolicyError
from .item import Item, ItemSource

logger = get_logger(__name__)


def batching_strategy(task: Any, app: Celery, consumer: Any, **kwargs: Any) -> Any:
    """Build the message handler for one batched task (called by ``Task.start_strategy``).

    The handler takes Celery's arguments; its ``receive_direct`` attribute takes a bare kombu
    message, for the Redis bulk fetch (``_internals.kombu_redis``), and does what Celery's
    ``Consumer.on_task_received`` does around a strategy.
    """
    batching = getattr(consumer, "batching", None)
    if batching is None:
        # A consumer built before any BatchedTask was bound to the app: Celery's testing pattern
        # (a task defined in the test, then celery_worker.reload()). The step is attached now
        # and starts on the consumer's thread (BatchingStep.attach_late).
        from .bootstep import BatchingStep

        batching = BatchingStep.attach_late(consumer)
        if batching is None:
            raise BatchingNotInstalledError(
                f"{task.name} is a BatchedTask but this worker's consumer has no batching "
                f"bootstep, and none can be attached to it now (it is stopping, or it is not a "
                f"Celery consumer); add app.steps['consumer'].add(celery_batched.BatchingStep) "
                f"where the app is defined, before the worker starts")
    hostname = consumer.hostname
    connection_errors = consumer.connection_errors
    does_debug = logger.isEnabledFor(logging.DEBUG)
    call_at = consumer.timer.call_at
    Req = create_request_cls(symbol_by_name(task.Request), task, consumer.pool, hostname,
                             consumer.event_dispatcher, app=app)
    revoked_tasks = worker_state.revoked
    accept = worker.accepted_content_types(app)
    kombu_accept = app.conf.accept_content and worker.accepted_content_types(app)
    utc = app.uses_utc_timezone()
    task_scheduled = getattr(worker_state, "task_scheduled", None)  # Celery >= 5.6
    buffer_for = batching.buffers.for_task
    spec = task._batch_spec
    policy = spec.policy
    on_task_message = consumer.on_task_message

    def build_request(item: Item, body: Any = None, headers: Any = None, decoded: bool = False) -> Any:
        on_ack, on_reject = worker.ack_promises(consumer, item.message)
        return Req(item.message, on_ack=on_ack, on_reject=on_reject, app=app, hostname=hostname,
                   eventer=consumer.event_dispatcher, task=task,
                   connection_errors=connection_errors, body=body or item.message.body,
                   headers=headers or item.headers, decoded=decoded, utc=utc)

    source = ItemSource(task, build_request, connection_errors)

    def enter_buffer(item: Item) -> None:
        worker.task_reserved(item)
        if policy is None:
            buffer_for(task).put(item)
            return
        try:
            key, cost = evaluate_policy(item)
        except Exception as exc:  # undecodable, bad arguments, or the policy function failed
            # The pool reports decode and argument errors itself, as for any item.
            item.error = exc if isinstance(exc, ItemPolicyError) else None
            buffer_for(task).put_alone(item)
            return
        buffer_for(task).put(item, key, cost)

    def evaluate_policy(item: Item) -> tuple[Any, float]:
        """``batch_key``/``batch_cost`` need the item's arguments: decode the body here (once;
        the pool gets it decoded)."""
        assert policy is not None
        req = item._request
        if req is not None and req._decoded:
            payload = req._payload
        else:
            message = item.message
            payload = item.payload = trace.decode_body(
                message.body, message.content_type, message.content_encoding, accept)
        row = spec.bind_item(payload[0], payload[1])
        return policy.key(row), policy.cost(row)

    def eta_due(item: Item) -> None:
        consumer.qos.decrement_eventually()
        worker.task_ready(item.request())  # leaves the scheduled set
        item.buffered_at = time.monotonic()  # its wait in the buffer starts now, not at receipt
        enter_buffer(item)

    def handle(message: Any, body: Any, callbacks: Any) -> None:
        headers = message.headers
        if body is None and "id" in headers:  # protocol 2: the body stays encoded
            if message.content_type not in accept:
                raise ContentDisallowed(
                    f"Refusing to deserialize untrusted content of type {message.content_type} "
                    f"({message.content_encoding})")
            item = Item(message, headers, source)
        else:  # protocol 1, or a hybrid message: Celery's conversion, decoded here
            if body is None:
                body, headers, decoded, _ = hybrid_to_proto2(message, message.payload)
            else:
                body, headers, decoded, _ = proto1_to_proto2(message, body)
            if not headers.get("id"):
                raise InvalidTaskError(f"{task.name}: message without a task id")
            item = Item(message, headers, source)
            item._request = build_request(item, body, headers, decoded)
        if does_debug:
            # Payloads stay out of the logs (they may be user data): id, name and ETA only.
            context = {"id": item.id, "name": task.name, "args": "...", "kwargs": "...",
                       "eta": headers.get("eta")}
            logger.debug(_app_trace.LOG_RECEIVED, context, extra={"data": context})
        if (item.id in revoked_tasks or headers.get("expires")) and item.revoked():
            return

        if signals.task_received.receivers:
            signals.task_received.send(sender=consumer, request=item.request())
        if worker.task_events_on(consumer.event_dispatcher, task):
            consumer.event_dispatcher.send("task-received", uuid=item.id,
                                           **worker.received_event_fields(headers))
        if headers.get("eta"):
            schedule_eta(item)
            return
        if callbacks:
            req = item.request()
            for callback in callbacks:
                callback(req)
        enter_buffer(item)

    def schedule_eta(item: Item) -> None:
        req = item.request()
        try:
            if req.utc:
                eta = to_timestamp(timezone.to_system(req.eta))
            else:
                eta = to_timestamp(req.eta, app.timezone)
        except (OverflowError, ValueError) as exc:
            logger.error("Couldn't convert ETA %r to timestamp: %r. Task: %s[%s]",
                         req.eta, exc, task.name, req.id)
            task.backend.mark_as_failure(req.id, exc, request=req._context,
                                         store_result=req.store_errors)
            req.reject(requeue=False)
            return
        # Waiting for its ETA, an item takes no batch slot; Celery raises prefetch for it.
        consumer.qos.increment_eventually()
        req._eta_timer_entry = call_at(eta, eta_due, (item,), priority=6)
        if task_scheduled is not None:
            task_scheduled(req)

    def task_message_handler(message: Any, body: Any, ack: Any, reject: Any, callbacks: Any,
                             **_: Any) -> None:
        with batching.thread_lock:
            handle(message, body, callbacks)

    def receive_direct(message: Any) -> None:
        # What Celery's Consumer.on_task_received and kombu's Consumer._receive_callback do
        # around a strategy (Celery 5.5-5.7, kombu 5.5-5.7).
        if kombu_accept:
            message.accept = kombu_accept
        try:
            if message.errors:
                return message._reraise_error(consumer.on_decode_error)
            with batching.thread_lock:
                handle(message, None, on_task_message)
        except (InvalidTaskError, ContentDisallowed) as exc:
            consumer.on_invalid_task(None, message, exc)
        except DecodeError as exc:
            consumer.on_decode_error(message, exc)

    task_message_handler.receive_direct = receive_direct  # type: ignore[attr-defined]
    return task_message_handler
