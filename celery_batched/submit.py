"""Bulk submit: send many items of a batched task with one producer and pipelined publishes.

An ``apply_async`` loop costs one broker round trip per item plus Celery's per-call routing,
queue declaration and result subscription. Here the route is resolved and the queue declared once
per call, messages are built with Celery's own ``amqp.as_task_v2`` and published to the resolved
queue through the default exchange, inside
kombu's ``Producer.batch()`` (one Redis pipeline per 1,000 messages; other transports publish as
usual). Every item still gets its own task id and ``AsyncResult``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from celery import signals
from celery.result import AsyncResult, ResultSet
from celery.utils.nodenames import anon_nodename
from kombu.utils.uuid import uuid

from .errors import ItemArgumentsError

if TYPE_CHECKING:
    from .task import BatchedTask

PUBLISH_BATCH_SIZE = 1000
_MESSAGE_OPTIONS = ("countdown", "eta", "expires", "time_limit", "soft_time_limit",
                    "ignore_result", "shadow")


def starmap_items(task: BatchedTask, items: Iterable[Sequence[Any] | Mapping[str, Any]],
                  **options: Any) -> ResultSet:
    """Send one message per item (a tuple of positional args, or a dict of keyword args).

    Returns a ``ResultSet`` of the items' ``AsyncResult``s in order (index it, iterate it, or
    ``.get()`` all values: on Redis that reads finished results with MGET, ~5x faster than
    calling ``.get()`` on each).
    """
    app = task.app
    if _needs_full_apply_async(task, options):
        with app.producer_or_acquire() as producer:
            return ResultSet([task.apply_async(*_split(item), producer=producer, **options)
                              for item in items], app=app)

    spec = task._batch_spec
    amqp = app.amqp
    route = amqp.router.route(dict(options), task.name, (), {})
    queue = route["queue"]
    message_options = {k: options[k] for k in _MESSAGE_OPTIONS if k in options}
    message_options.setdefault("ignore_result", task.ignore_result)
    priority = options.get("priority", route.get("priority"))
    origin = anon_nodename()
    backend = task.backend
    subscribe = _backend_needs_on_task_call(backend)

    results: list[AsyncResult] = []
    with app.producer_or_acquire() as producer:
        producer.maybe_declare(queue)
        with producer.batch(PUBLISH_BATCH_SIZE):
            for index, item in enumerate(items):
                args, kwargs = _split(item)
                try:
                    spec.bind_item(args, kwargs)
                except ItemArgumentsError as exc:
                    raise ItemArgumentsError(f"item {index}: {exc}") from None
                task_id = uuid()
                message = amqp.as_task_v2(task_id, task.name, args, kwargs, origin=origin,
                                          **message_options)
                if subscribe:
                    backend.on_task_call(producer, task_id)
                producer.publish(
                    # The default exchange delivers straight to the named queue on AMQP and
                    # Redis alike, without a per-message binding lookup on Redis.
                    message.body, exchange="", routing_key=queue.name,
                    serializer=task.serializer, compression=app.conf.task_compression,
                    headers=message.headers, priority=priority, declare=None,
                    retry=True, **message.properties)
                results.append(AsyncResult(task_id, backend=backend, task_name=task.name, app=app))
    return ResultSet(results, app=app)


def _split(item: Sequence[Any] | Mapping[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(item, Mapping):
        return (), dict(item)
    if isinstance(item, (str, bytes)) or not isinstance(item, Sequence):
        raise TypeError(f"starmap_items takes a tuple of arguments (or a dict of keyword "
                        f"arguments) per item, got {type(item).__name__}; use map_items "
                        f"for single values")
    return tuple(item), {}


def _needs_full_apply_async(task: BatchedTask, options: Mapping[str, Any]) -> bool:
    """Options and hooks only ``apply_async`` implements: take the slow, complete path."""
    return bool(
        task.app.conf.task_always_eager
        or task.app.conf.task_send_sent_event
        or signals.before_task_publish.receivers
        or signals.after_task_publish.receivers
        or set(options) - {"queue", "priority", *_MESSAGE_OPTIONS}
    )


def _backend_needs_on_task_call(backend: Any) -> bool:
    # The Redis backend's on_task_call only subscribes early to the result channel, and
    # AsyncResult.get() re-checks the stored state after subscribing, so skipping it loses nothing.
    # Other backends (rpc://) need it to route results back to this client.
    try:
        from celery.backends.redis import RedisBackend
    except ImportError:  # pragma: no cover
        return True
    from celery.backends.base import Backend
    return not isinstance(backend, RedisBackend) and type(backend).on_task_call is not Backend.on_task_call
