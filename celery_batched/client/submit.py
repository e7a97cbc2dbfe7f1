"""Bulk submit and bulk collection: many items of a batched task in few round trips.

Sending: an ``apply_async`` loop costs one broker round trip per item plus Celery's per-call
routing, queue declaration and result subscription. Here every item is checked first, the route
is resolved and the queue declared once, one message is built with Celery's own
``amqp.as_task_v2`` and every other message differs from it only in its ids, argument reprs and
body. On Redis they are spliced from that template and written in LPUSH pipelines of 1,000
(``_internals.kombu_redis.RedisBulkPublisher``), each ``task-sent`` event (``task_send_sent_event``) in the
same pipeline; elsewhere they go through kombu's producer one by one. Every item still gets its
own task id and ``AsyncResult``.

Collecting: ``ItemResults.get()`` reads finished results with ``MGET`` in chunks and decodes
them directly (``redis_results.read``), instead of subscribing to one channel per result.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from celery import Celery, signals, states
from celery.result import AsyncResult, EagerResult, ResultSet
from celery.utils.nodenames import anon_nodename
from celery.utils.saferepr import saferepr

from .._internals import redis_results
from .._internals.client import LazyAsyncResult, prepare_event, producer_internals
from .._internals.kombu_redis import RedisBulkPublisher
from ..errors import ItemArgumentsError
from ..protocol import BatchedTaskLike
from . import backlog

PUBLISH_BATCH_SIZE = 1000
_MESSAGE_OPTIONS = ("countdown", "eta", "expires", "time_limit", "soft_time_limit",
                    "ignore_result", "shadow", "reply_to")


class ItemResults(list[AsyncResult]):
    """The items' ``AsyncResult``s, in order; ``.get()`` collects every value at once.

    A plain list, so sending subscribes to nothing: a celery ``ResultSet`` built up front would
    subscribe to each result's channel while sending.
    """

    def __init__(self, results: Iterable[AsyncResult], app: Celery) -> None:
        super().__init__(results)
        self.app = app

    def get(self, timeout: float | None = None, propagate: bool = True, interval: float = 0.01,
            disable_sync_subtasks: bool = True, **kwargs: Any) -> list[Any]:
        """Every item's value, in order (``ResultSet.get`` semantics).

        With ``propagate`` the first failed item (in item order) raises its exception.
        ``interval``: seconds between reads of the results not finished yet (up to 10x that
        while nothing finishes). Backends other than Redis (``rpc://`` included: its results
        come to this thread's reply queue) collect through Celery's ``ResultSet.get``.
        """
        backend = self.app.backend
        # Eager results (task_always_eager: starmap_items took apply_async) are never stored.
        if not redis_results.can_read(backend) or any(isinstance(r, EagerResult) for r in self):
            return ResultSet(list(self), app=self.app).get(
                timeout=timeout, propagate=propagate, interval=interval,
                disable_sync_subtasks=disable_sync_subtasks, **kwargs)
        if disable_sync_subtasks:
            from celery.result import assert_will_not_block

            assert_will_not_block()
        metas = _wait_for_metas(backend, [r.id for r in self], timeout, interval)
        values = []
        for result, meta in zip(self, metas):
            if isinstance(result, LazyAsyncResult) and not result.waited_on:
                result._set_cache(meta)  # nobody waits on it: no promise to fulfil
            else:
                result._maybe_set_cache(meta)
            if meta["status"] in states.PROPAGATE_STATES and propagate:
                result.maybe_throw(propagate=True)
            values.append(meta["result"])
        return values


def _wait_for_metas(backend: Any, ids: list[str], timeout: float | None,
                    interval: float) -> list[dict[str, Any]]:
    from celery.exceptions import TimeoutError as CeleryTimeoutError

    metas: list[dict[str, Any] | None] = [None] * len(ids)
    pending = list(range(len(ids)))
    deadline = None if timeout is None else time.monotonic() + timeout
    sleep = interval
    while True:
        found = redis_results.read(backend, [ids[i] for i in pending])
        still = []
        for i, meta in zip(pending, found):
            if meta is not None and meta["status"] in states.READY_STATES:
                metas[i] = meta
            else:
                still.append(i)
        sleep = interval if len(still) < len(pending) else min(sleep * 2, interval * 10)
        pending = still
        if not pending:
            return metas  # type: ignore[return-value]
        if deadline is not None and time.monotonic() + sleep > deadline:
            raise CeleryTimeoutError(f"{len(pending)} of {len(ids)} results not ready after "
                                     f"{timeout}s (first pending: {ids[pending[0]]})")
        time.sleep(sleep)


def starmap_items(task: BatchedTaskLike, items: Iterable[Sequence[Any] | Mapping[str, Any]],
                  **options: Any) -> ItemResults:
    """Send one message per item (a tuple of positional args, or a dict of keyword args).

    ``max_backlog`` (default: the task's) refuses them all with ``Backpressure`` when the queue
    holds that many messages, or would with them.
    """
    app = task.app
    spec = task._batch_spec
    limit = options.pop("max_backlog", task.max_backlog)
    calls = [_split(item) for item in items]
    for index, (args, kwargs) in enumerate(calls):  # all checked before anything is sent
        try:
            spec.bind_item(args, kwargs)
        except ItemArgumentsError as exc:
            raise ItemArgumentsError(f"item {index}: {exc}") from None
    backlog.check(task, len(calls), limit, options)
    if _needs_full_apply_async(task, options):
        with app.producer_or_acquire() as producer:
            return ItemResults([task.apply_async(args, kwargs, producer=producer,
                                                 max_backlog=None, **options)
                                for args, kwargs in calls], app)
    with app.producer_or_acquire() as producer:
        return ItemResults(_BulkSend(task, producer, options).send(calls), app)


class _BulkSend:
    """One ``starmap_items`` call: the route, the message template, the publisher."""

    def __init__(self, task: BatchedTaskLike, producer: Any, options: dict[str, Any]) -> None:
        app = self.app = task.app
        self.task = task
        self.producer = producer
        amqp = app.amqp
        route = amqp.router.route(dict(options), task.name, (), {})
        self.queue = route["queue"]
        self.priority = options.get("priority", route.get("priority"))
        message_options = {k: options[k] for k in _MESSAGE_OPTIONS if k in options}
        message_options.setdefault("ignore_result", task.ignore_result)
        # As Celery's send_task does (``reply_to or self.thread_oid``): the rpc:// backend
        # publishes each result to its message's reply_to, the queue this thread's
        # backend consumes (its ``oid``); without it results go nowhere and .get() times out.
        message_options["reply_to"] = options.get("reply_to") or app.thread_oid
        sent_event = bool(app.conf.task_send_sent_event)
        self.template = amqp.as_task_v2("", task.name, (), {}, origin=anon_nodename(),
                                        create_sent_event=sent_event, **message_options)
        self.maxsize = amqp.argsrepr_maxsize, amqp.kwargsrepr_maxsize
        self.maxlevels = app.conf.get("task_repr_maxlevels", 3)  # Celery >= 5.7 has the setting
        self.serializer = getattr(task, "serializer", None) or app.conf.task_serializer
        self.compression = app.conf.task_compression
        self.events = app.events.Dispatcher(producer.connection, enabled=False) if sent_event else None
        self.subscribe = _backend_needs_on_task_call(task.backend)
        producer.maybe_declare(self.queue)
        self._prepare, self._publish, delivery_mode = producer_internals(producer)
        self.properties = {**self.template.properties, "delivery_mode": delivery_mode}

    def send(self, calls: list[tuple[tuple[Any, ...], dict[str, Any]]]) -> list[AsyncResult]:
        fast = None
        if self.serializer == "json" and not self.compression:
            fast = RedisBulkPublisher.for_channel(self.producer.channel, self.queue.name)
        ids = _uuid4s(len(calls))
        try:
            if fast is not None:
                self._send_spliced(fast, calls, ids)
            else:
                self._send_each(calls, ids)
        finally:
            if fast is not None:
                fast.close()
        backend, app, name = self.task.backend, self.app, self.task.name
        return [LazyAsyncResult(task_id, backend, name, app) for task_id in ids]

    def _reprs(self, args: Any, kwargs: Any) -> tuple[str, str]:
        return (_repr(args, self.maxsize[0], self.maxlevels),
                _repr(kwargs, self.maxsize[1], self.maxlevels) if kwargs else "{}")

    def _send_spliced(self, fast: RedisBulkPublisher, calls: Sequence[Any], ids: list[str]) -> None:
        headers = self.template.headers
        _, _, embed = self.template.body
        fast.set_task_template(self.priority, "application/json", "utf-8", headers,
                               self.properties, embed)
        events = self.events
        if events is not None:  # one event from Celery's own EventDispatcher, the rest spliced
            fast.set_event_template(events.exchange.name, "task.sent", "application/json",
                                    "utf-8", events.headers, events.delivery_mode,
                                    prepare_event(events, "task-sent", self._event_fields()))
            forward, now = events.clock.forward, time.time
        tags = _uuid4s(len(calls) * (2 if events is not None else 1))
        for k, ((args, kwargs), task_id) in enumerate(zip(calls, ids)):
            argsrepr, kwargsrepr = self._reprs(args, kwargs)
            if self.subscribe:
                self.task.backend.on_task_call(self.producer, task_id)
            fast.publish_task(task_id, args, kwargs, argsrepr, kwargsrepr, tags[k])
            if events is not None:
                fast.publish_event(task_id, argsrepr, kwargsrepr, forward(), now(),
                                   tags[len(calls) + k])
        fast.flush()

    def _event_fields(self) -> dict[str, Any]:
        """Celery's ``send_task_message`` adds the route to ``as_task_v2``'s sent_event."""
        return {**self.template.sent_event, "queue": self.queue.name,
                "exchange": self.queue.exchange.name if self.queue.exchange else "",
                "routing_key": self.queue.routing_key or self.queue.name}

    def _send_each(self, calls: Sequence[Any], ids: list[str]) -> None:
        producer = self.producer
        prepare, publish = self._prepare, self._publish
        batch = getattr(producer, "batch", None)  # kombu >= 5.7: its own retry-safe batching
        context = batch(PUBLISH_BATCH_SIZE) if batch is not None else _nullcontext()
        _, _, embed = self.template.body
        with context:
            for (args, kwargs), task_id in zip(calls, ids):
                argsrepr, kwargsrepr = self._reprs(args, kwargs)
                headers = {**self.template.headers, "id": task_id, "root_id": task_id,
                           "argsrepr": argsrepr, "kwargsrepr": kwargsrepr}
                if self.subscribe:
                    self.task.backend.on_task_call(producer, task_id)
                body, content_type, content_encoding = prepare(
                    (args, kwargs, embed), self.serializer, None, None, self.compression, headers)
                # The default exchange delivers straight to the named queue.
                publish(body, self.priority, content_type, content_encoding, headers,
                        {**self.properties, "correlation_id": task_id}, self.queue.name,
                        False, False, "", None)
                if self.events is not None:
                    self.events.publish("task-sent", {
                        **self._event_fields(), "uuid": task_id, "root_id": task_id,
                        "args": argsrepr, "kwargs": kwargsrepr}, producer)


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def _uuid4s(n: int) -> list[str]:
    """``n`` random (version 4) UUID strings, as ``uuid.uuid4()`` makes them, from one read of
    the OS's randomness instead of one per id."""
    raw = bytearray(os.urandom(16 * n))
    raw[6::16] = bytes((b & 0x0F) | 0x40 for b in raw[6::16])  # version 4
    raw[8::16] = bytes((b & 0x3F) | 0x80 for b in raw[8::16])  # RFC 4122 variant
    h = raw.hex()
    return [f"{h[k:k + 8]}-{h[k + 8:k + 12]}-{h[k + 12:k + 16]}-{h[k + 16:k + 20]}-{h[k + 20:k + 32]}"
            for k in range(0, 32 * n, 32)]


_PLAIN = frozenset((int, float, bool, type(None)))


def _repr(value: Any, maxsize: int, maxlevels: int) -> str:
    """Celery's ``saferepr`` of the arguments; plain ``repr`` when that is the same and short.

    ``saferepr`` streams and truncates, which costs a quarter of a bulk submit for the small
    scalar arguments most items have.
    """
    parts = value.values() if isinstance(value, dict) else value
    if all(type(v) in _PLAIN or (type(v) is str and len(v) < 256) for v in parts):
        text = repr(value)
        if len(text) <= maxsize:
            return text
    return saferepr(value, maxsize, maxlevels=maxlevels)


def _split(item: Sequence[Any] | Mapping[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if type(item) is tuple:
        return item, {}
    if isinstance(item, Mapping):
        return (), dict(item)
    if isinstance(item, (str, bytes)) or not isinstance(item, Sequence):
        raise TypeError(f"starmap_items takes a tuple of arguments (or a dict of keyword "
                        f"arguments) per item, got {type(item).__name__}; use map_items "
                        f"for single values")
    return tuple(item), {}


def _needs_full_apply_async(task: BatchedTaskLike, options: Mapping[str, Any]) -> bool:
    """Options and hooks only ``apply_async`` implements: take the slow, complete path."""
    return bool(
        task.app.conf.task_always_eager
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
