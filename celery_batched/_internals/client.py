"""Client side: what bulk submit and bulk collection mirror of ``celery.result`` and
``celery.events`` (Celery 5.5-5.7)."""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.app import app_or_default
from celery.result import AsyncResult
from vine import promise


class LazyAsyncResult(AsyncResult):
    """An ``AsyncResult`` whose ``on_ready`` promise is made on first use.

    ``AsyncResult.__init__`` builds a weak-method promise per result: a quarter of a bulk
    submit's time, for results mostly collected with ``ItemResults.get``, which never uses it.
    Mirrors ``celery.result.AsyncResult.__init__`` (Celery 5.5-5.7) otherwise.
    """

    def __init__(self, id: str, backend: Any = None, task_name: str | None = None,
                 app: Celery = None, parent: Any = None) -> None:
        if id is None:
            raise ValueError(f"AsyncResult requires valid id, not {type(id)}")
        self.app = app_or_default(app or AsyncResult.__dict__.get("app"))
        self.id = id
        self.backend = backend or self.app.backend
        self.parent = parent
        self._cache = None
        self._ignored = False

    @property
    def waited_on(self) -> bool:
        """Whether anything made (and so may wait on) its ``on_ready`` promise."""
        return "_lazy_on_ready" in self.__dict__

    @property
    def on_ready(self) -> Any:
        ready = self.__dict__.get("_lazy_on_ready")
        if ready is None:
            ready = self.__dict__["_lazy_on_ready"] = promise(self._on_fulfilled, weak=True)
        return ready

    @on_ready.setter
    def on_ready(self, value: Any) -> None:
        self.__dict__["_lazy_on_ready"] = value


def prepare_event(dispatcher: Any, type_: str, fields: dict[str, Any]) -> dict[str, Any]:
    """One event as ``EventDispatcher.publish`` would send it: the clock forwarded, hostname,
    utcoffset, pid, timestamp. Mirrors ``EventDispatcher._prepare_event`` (Celery 5.7; inlined
    in ``EventDispatcher.publish`` before)."""
    prepare = getattr(dispatcher, "_prepare_event", None)
    if prepare is not None:
        return prepare(type_, fields)
    from celery.events.event import Event
    from celery.utils.time import utcoffset

    return Event(type_, hostname=dispatcher.hostname, utcoffset=utcoffset(), pid=dispatcher.pid,
                 clock=dispatcher.clock.forward(), **fields)


def producer_internals(producer: Any) -> tuple[Any, Any, Any]:
    """``(prepare, publish, delivery_mode)`` of a kombu ``Producer``: what ``Producer.publish``
    does per message, split so that bulk submit resolves the route and the delivery mode once
    and then encodes (``_prepare``) and sends (``_publish``) each message. Mirrors
    ``kombu.messaging.Producer.publish`` (kombu 5.6-5.7)."""
    _, delivery_mode = producer._delivery_details("", None)
    return producer._prepare, producer._publish, delivery_mode


def queue_messages(channel: Any, queue: str) -> int:
    """Messages waiting in ``queue`` (not yet delivered to any consumer), in one round trip.

    kombu's Redis transport: one pipeline of ``LLEN`` over the queue's priority lists -- what
    ``Channel._size`` counts, without the ``EXISTS`` round trip that a passive
    ``queue_declare`` adds (mirrors ``kombu.transport.redis.Channel._size``). Other transports:
    a passive ``queue_declare``'s ``message_count`` (AMQP ``queue.declare-ok``); a queue that
    doesn't exist holds nothing (the caller's channel is then closed by an AMQP broker).
    """
    from kombu.transport import redis as kombu_redis

    if isinstance(channel, kombu_redis.Channel) and not channel.global_keyprefix:
        with channel.conn_or_acquire() as client, client.pipeline(transaction=False) as pipe:
            for pri in channel.priority_steps:
                pipe.llen(channel._q_for_pri(queue, pri))
            return int(sum(pipe.execute()))
    return int(channel.queue_declare(queue=queue, passive=True).message_count)
