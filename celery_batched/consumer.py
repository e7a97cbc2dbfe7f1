"""Message -> buffer: the consumer-side strategy of batched tasks.

Celery calls a task's *strategy* for every message of that task the worker receives. This one
mirrors ``celery.worker.strategy.default`` (Celery 5.5-5.7) -- same Request class, logging,
revocation check, ``task_received`` signal, ``task-received`` event and ETA handling -- but where
the default hands the request to the pool, this one puts it in the task's buffer. Rate limits
(token buckets per task) don't apply: a batch is the unit of work.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import signals
from celery.app import trace as _app_trace
from celery.utils.imports import symbol_by_name
from celery.utils.log import get_logger
from celery.utils.time import timezone
from celery.worker.request import create_request_cls
from celery.worker.state import task_reserved, task_scheduled
from celery.worker.strategy import hybrid_to_proto2, proto1_to_proto2
from kombu.asynchronous.timer import to_timestamp

from .errors import BatchingNotInstalledError

logger = get_logger(__name__)


def batching_strategy(task: Any, app: Any, consumer: Any, **kwargs: Any) -> Any:
    """Build the message handler for one batched task (called by ``Task.start_strategy``)."""
    batching = getattr(consumer, "batching", None)
    if batching is None:
        raise BatchingNotInstalledError(
            f"{task.name} is a BatchedTask but this worker's consumer has no batching bootstep; "
            f"add app.steps['consumer'].add(celery_batched.BatchingStep) where the app is defined")
    hostname = consumer.hostname
    connection_errors = consumer.connection_errors
    # Per item at DEBUG, not INFO as Celery's default strategy: a batched worker takes thousands
    # of items a second, and the buffer's flush logs one INFO line per batch instead.
    does_debug = logger.isEnabledFor(logging.DEBUG)
    eventer = consumer.event_dispatcher
    task_sends_events = eventer and eventer.enabled and task.send_events
    send_event = eventer and eventer.send
    call_at = consumer.timer.call_at
    Req = create_request_cls(symbol_by_name(task.Request), task, consumer.pool, hostname,
                             eventer, app=app)
    revoked_tasks = consumer.controller.state.revoked
    name = task.name

    def enter_buffer(req: Any) -> None:
        task_reserved(req)
        batching.buffer_for(task).put(req)

    def eta_due(req: Any) -> None:
        consumer.qos.decrement_eventually()
        enter_buffer(req)

    def task_message_handler(message: Any, body: Any, ack: Any, reject: Any, callbacks: Any,
                             **_: Any) -> None:
        if body is None and "args" not in message.payload:
            body, headers, decoded, utc = (message.body, message.headers, False,
                                           app.uses_utc_timezone())
        elif "args" in message.payload:
            body, headers, decoded, utc = hybrid_to_proto2(message, message.payload)
        else:
            body, headers, decoded, utc = proto1_to_proto2(message, body)

        req = Req(message, on_ack=ack, on_reject=reject, app=app, hostname=hostname,
                  eventer=eventer, task=task, connection_errors=connection_errors,
                  body=body, headers=headers, decoded=decoded, utc=utc)
        if does_debug:
            # Payloads stay out of the logs (they may be user data): id, name and ETA only.
            context = {"id": req.id, "name": req.name, "args": "...", "kwargs": "...",
                       "eta": req.eta}
            logger.debug(_app_trace.LOG_RECEIVED, context, extra={"data": context})
        if (req.expires or req.id in revoked_tasks) and req.revoked():
            return

        if signals.task_received.receivers:
            signals.task_received.send(sender=consumer, request=req)
        if task_sends_events:
            send_event("task-received", uuid=req.id, name=req.name, args=req.argsrepr,
                       kwargs=req.kwargsrepr, root_id=req.root_id, parent_id=req.parent_id,
                       retries=req.request_dict.get("retries", 0),
                       eta=req.eta and req.eta.isoformat(),
                       expires=req.expires and req.expires.isoformat())

        if req.eta:
            try:
                if req.utc:
                    eta = to_timestamp(timezone.to_system(req.eta))
                else:
                    eta = to_timestamp(req.eta, app.timezone)
            except (OverflowError, ValueError) as exc:
                logger.error("Couldn't convert ETA %r to timestamp: %r. Task: %s[%s]",
                             req.eta, exc, name, req.id)
                req.task.backend.mark_as_failure(req.id, exc, request=req._context,
                                                 store_result=req.store_errors)
                req.reject(requeue=False)
                return
            # Waiting for its ETA, an item takes no batch slot and no prefetch slot.
            consumer.qos.increment_eventually()
            req._eta_timer_entry = call_at(eta, eta_due, (req,), priority=6)
            task_scheduled(req)
            return

        if callbacks:
            for callback in callbacks:
                callback(req)
        enter_buffer(req)

    return task_message_handler
