"""Consumer side: what the worker's main process mirrors of Celery's strategy, ``Request``
and worker state (Celery 5.5-5.7), for items that are not Celery ``Request`` objects."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from celery import Celery
from celery.worker import state as worker_state
from kombu.serialization import prepare_accept_content
from vine import promise


def accepted_content_types(app: Celery) -> frozenset[str]:
    """The MIME types the worker accepts (``accept_content``), as kombu checks them on decode.

    Mirrors ``kombu.serialization.prepare_accept_content`` plus the trusted types that
    ``SerializerRegistry.loads`` lets through.
    """
    from kombu.serialization import TRUSTED_CONTENT

    return frozenset(prepare_accept_content(app.conf.accept_content) or ()) | TRUSTED_CONTENT


def task_events_on(eventer: Any, task: Any) -> bool:
    """Whether a per-task event would be sent now (``-E``, or ``control enable_events``).

    Mirrors ``Request.send_event`` + ``EventDispatcher.send``: heartbeats keep the dispatcher
    enabled without ``-E``, with its groups limited to ``worker``.
    """
    if not (eventer and eventer.enabled and task.send_events):
        return False
    groups = eventer.groups
    return not groups or "task" in groups


def received_event_fields(headers: dict[str, Any]) -> dict[str, Any]:
    """The ``task-received`` event's fields. Mirrors ``celery.worker.strategy.default``."""
    return {"name": headers.get("shadow") or headers["task"], "args": headers.get("argsrepr", ""),
            "kwargs": headers.get("kwargsrepr", ""), "root_id": headers.get("root_id"),
            "parent_id": headers.get("parent_id"), "retries": headers.get("retries", 0),
            "eta": headers.get("eta"), "expires": headers.get("expires")}


#: Mirror ``celery.worker.state.task_reserved`` / ``task_ready`` (Celery 5.5-5.7).
task_reserved = worker_state.task_reserved
task_ready = worker_state.task_ready


def reserved_requests() -> Any:
    """The worker's reserved requests (``celery.worker.state.reserved_requests``)."""
    return worker_state.reserved_requests


def revoked_stamps() -> dict[str, Any]:
    """Stamped-header revocations (``revoke_by_stamped_headers``) this worker knows of."""
    return getattr(worker_state, "revoked_stamps", None) or {}


def task_ready_many(items: Sequence[Any]) -> None:
    """``celery.worker.state.task_ready`` for items that succeeded and are acknowledged.

    Skips ``successful_requests``: it only keeps ``cancel_active_requests`` from cancelling a
    task that succeeded but isn't acknowledged yet, and these are acknowledged already.
    """
    pop = worker_state.requests.pop
    sets = [worker_state.active_requests, worker_state.reserved_requests]
    scheduled = getattr(worker_state, "scheduled_requests", None)
    if scheduled is not None:
        sets.append(scheduled)
    for item in items:
        pop(item.id, None)
    for s in sets:
        for item in items:
            s.discard(item)


def task_accepted_many(items: Sequence[Any], name: str) -> None:
    """``celery.worker.state.task_accepted`` for a whole batch, with one counter update."""
    add_request, add_active = worker_state.requests.__setitem__, worker_state.active_requests.add
    for item in items:
        add_request(item.id, item)
        add_active(item)
    worker_state.total_count[name] += len(items)
    worker_state.all_total_count[0] += len(items)


def ack_promises(consumer: Any, message: Any) -> tuple[Any, Any]:
    """The ack and reject callbacks a ``Request`` is built with.

    Mirrors ``celery.worker.consumer.Consumer.create_task_handler``'s ``on_task_received``
    (Celery 5.5-5.7: ``call_soon_ack`` where it exists, and the prefetch restoration after a
    reconnect), built only for the items that get a ``Request``.
    """
    call_soon = getattr(consumer, "call_soon_ack", None) or consumer.call_soon
    restore = getattr(consumer, "_restore_prefetch_count_after_connection_restart", None)
    ack = promise(call_soon, (message.ack_log_error,), on_error=restore)
    reject = promise(call_soon, (message.reject_log_error,), on_error=restore)
    if restore is not None and _prefetch_reduced(consumer):
        ack.then(restore, on_error=restore)
        reject.then(restore, on_error=restore)
    return ack, reject


class HeldAcks:
    """A ``Request``'s acknowledgements, held until its handler has stored the outcome.

    Celery's ``Request.on_failure`` acknowledges a message *before* it stores the failure of a
    lost or timed-out task: during a backend outage the item would be acknowledged with nothing
    stored. While held, ``Request.acknowledge``/``reject`` only record what they would send
    (mirrors their calls of ``Request._on_ack``/``_on_reject``, Celery 5.6-5.7); ``release``
    sends it, ``discard`` drops it (the item is handed back instead).
    """

    __slots__ = ("request", "wanted", "_ack", "_reject", "_acknowledged")

    def __init__(self, request: Any) -> None:
        self.request = request
        self._acknowledged = request.acknowledged
        self.wanted: list[tuple[Any, tuple[Any, ...]]] = []
        self._ack, self._reject = request._on_ack, request._on_reject
        request._on_ack = lambda *args: self.wanted.append((self._ack, args))
        request._on_reject = lambda *args: self.wanted.append((self._reject, args))

    def _restore(self) -> list[tuple[Any, tuple[Any, ...]]]:
        self.request._on_ack, self.request._on_reject = self._ack, self._reject
        wanted, self.wanted = self.wanted, []
        return wanted

    def release(self) -> bool:
        """Send the held acknowledgements; whether there were any."""
        wanted = self._restore()
        for send, args in wanted:
            send(*args)
        return bool(wanted)

    def discard(self) -> None:
        self._restore()
        self.request.acknowledged = self._acknowledged


def _prefetch_reduced(consumer: Any) -> bool:
    return bool(not getattr(consumer, "_maximum_prefetch_restored", True)
                and consumer.restart_count > 0
                and consumer._new_prefetch_count <= consumer.max_prefetch_count)


def restore_prefetch_after_acks(consumer: Any, acked: int) -> None:
    """Celery raises its prefetch count back after a reconnect one ack at a time (through the
    ack promises); batched items acked in bulk do the same. Mirrors the ``then`` above."""
    restore = getattr(consumer, "_restore_prefetch_count_after_connection_restart", None)
    while acked > 0 and restore is not None and _prefetch_reduced(consumer):
        restore(None)
        acked -= 1


def delivery_details(message: Any) -> tuple[Any, ...]:
    """What ``Request.__init__`` takes from a message besides headers and body (Celery 5.5-5.7)."""
    info = message.delivery_info or {}
    props = message.properties or {}
    return (info.get("exchange"), info.get("routing_key"), props.get("priority"),
            info.get("redelivered", False), props.get("reply_to"), props.get("correlation_id"))


def static_prefetch_queue(consumer: Any) -> str | None:
    """The quorum queue that makes the consumer's prefetch count static, or None where it isn't.

    Mirrors celery.worker.consumer.tasks.Tasks.qos_global (Celery 5.6-5.7): on RabbitMQ (the
    amqp transport, ``not connection.qos_semantics_matches_spec``) Celery applies ``basic.qos``
    globally, unless ``worker_detect_quorum_queues`` finds a quorum queue among the app's queues:
    then ``global=False``, which RabbitMQ applies per consumer, and only to consumers that start
    after it. Celery 5.7 records its decision as ``consumer.qos_global``; 5.6 doesn't.
    """
    from celery.utils.quorum_queues import detect_quorum_queues

    connection = consumer.connection
    driver = connection.transport.driver_type
    if driver != "amqp" or connection.qos_semantics_matches_spec:
        return None
    quorum, queue = False, ""
    if consumer.app.conf.worker_detect_quorum_queues:
        quorum, queue = detect_quorum_queues(consumer.app, driver)
    qos_global = getattr(consumer, "qos_global", None)  # Celery 5.7; None before Tasks.start
    if qos_global is None:
        qos_global = not quorum
    return None if qos_global else str(queue)


def wrap_prefetch_sender(qos: Any, adjust: Any) -> None:
    """Every prefetch count Celery's ``QoS`` sends goes through ``adjust(count)`` first.

    Mirrors ``kombu.common.QoS.set``, which calls ``self.callback(prefetch_count=...)``
    (kombu 5.6-5.7): Celery keeps raising, lowering and restoring its own count, and the broker
    sees it plus batching's share.
    """
    send = qos.callback

    def send_adjusted(prefetch_count: int) -> Any:
        return send(prefetch_count=adjust(prefetch_count))

    qos.callback = send_adjusted


def resend_prefetch(qos: Any, now: bool = False) -> None:
    """Have ``QoS.update`` send the count again even if Celery's own value didn't change:
    ``now`` (on the consumer's thread), or at the consumer loop's next turn. Mirrors
    ``kombu.common.QoS.update``, which sends only when ``prev`` differs (kombu 5.6-5.7)."""
    qos.prev = None
    if now:
        qos.update()


def with_batch_events(request: Any, eventer_for: Any) -> Any:
    """``request`` whose own events (``task-failed``, ``task-retried``, ...) go through
    ``eventer_for(eventer)``, once. ``Request.send_event`` sends through ``Request._eventer``
    (Celery 5.6-5.7), which nothing else reads."""
    from .events import BatchEventer

    if not isinstance(request._eventer, BatchEventer):
        request._eventer = eventer_for(request._eventer)
    return request


def replace_can_consume(channel_qos: Any, may_fetch: Any) -> None:
    """The channel fetches when ``may_fetch()`` and kombu's own rule (the prefetch count) allow,
    in place of the rule Celery installs for ``worker_disable_prefetch``. Mirrors the
    ``can_consume`` that ``celery.worker.consumer.tasks.Tasks.start`` puts on the channel's
    ``QoS`` (Celery 5.6-5.7) over ``kombu.transport.virtual.base.QoS.can_consume``."""
    kombu_rule = type(channel_qos).can_consume

    def can_consume() -> bool:
        return may_fetch() and bool(kombu_rule(channel_qos))

    channel_qos.can_consume = can_consume
