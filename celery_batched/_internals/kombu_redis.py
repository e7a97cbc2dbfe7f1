"""Where celery_batched reaches into kombu's Redis transport (kombu 5.5-5.7): fewer round trips.

Per message, kombu's Redis transport costs three round trips: a BRPOP, a pipeline recording the
message as unacknowledged (``QoS.append``), and a pipeline removing that record on ack
(``QoS.ack``). The profile of a draining worker shows those round trips, not Python, as its cost.

* ``install_bulk_fetch``: after each BRPOP, one Lua script pops more messages of the same queue
  -- as many as the prefetch count allows, at most ``BULK_FETCH_MAX`` and about
  ``BULK_FETCH_MAX_BYTES`` -- and records each in kombu's unacked hash and index, the records
  ``QoS.append`` writes: atomically, so a crash can't lose a popped message (it is restored after
  ``visibility_timeout`` like any unacknowledged message).
* ``ack_many``: the acknowledgements of a batch in one round trip.
* ``RedisBulkPublisher``: bulk submit's messages in LPUSH pipelines, each sent exactly once.
* ``guard_close``: a channel whose broker died can still be closed (a kombu/Celery 5.7 bug that
  otherwise makes the worker exit; installed on every Redis task channel by the bootstep).
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable, Sequence
from queue import Empty  # what kombu's Redis _brpop_read raises for an empty reply
from typing import Any

from ..errors import BulkPublishError
from . import jsonc

logger = logging.getLogger(__name__)

try:
    from kombu.transport import redis as kombu_redis
    from kombu.transport.virtual.base import QoS as VirtualQoS
    from kombu.utils.encoding import bytes_to_str
    from kombu.utils.json import JSONEncoder, dumps
except ImportError:  # pragma: no cover
    kombu_redis = None  # type: ignore[assignment]

#: Messages popped per script call at most, whatever the prefetch allows.
BULK_FETCH_MAX = 256
#: Bytes popped per script call, about (the message that crosses it is the last one).
BULK_FETCH_MAX_BYTES = 4 * 1024 * 1024

def _decode(text: str | bytes) -> Any:
    """``kombu.utils.json.loads``: the same result, cheaper (``jsonc``)."""
    return jsonc.loads(text)

def _decode_many(raws: Sequence[bytes]) -> list[Any] | None:
    """Many popped messages decoded as ``_decode`` decodes each, in one call (``jsonc``)."""
    return jsonc.loads_many(raws)


# KEYS: unacked hash, unacked index, then the queue's lists by priority (BRPOP's order).
# ARGV: how many to pop, now, byte cap. The hash value is kombu's ``dumps([raw_message, exchange,
# routing_key])``, assembled around the raw JSON text so the message is stored byte for byte.
_POP_AND_TRACK = """
local function js(v) if v == nil then return 'null' end return cjson.encode(v) end
local out = {}
local n = tonumber(ARGV[1])
local max_bytes = tonumber(ARGV[3])
local bytes = 0
for k = 3, #KEYS do
  while #out < n and bytes < max_bytes do
    local raw = redis.call('RPOP', KEYS[k])
    if not raw then break end
    local props = cjson.decode(raw)['properties']
    local info = props['delivery_info'] or {}
    local tag = props['delivery_tag']
    redis.call('ZADD', KEYS[2], ARGV[2], tag)
    redis.call('HSET', KEYS[1], tag, '[' .. raw .. ', ' .. js(info['exchange']) .. ', ' .. js(info['routing_key']) .. ']')
    out[#out + 1] = raw
    bytes = bytes + #raw
  end
end
return out
"""


def install_bulk_fetch(channel: Any, receiver_for: Callable[[dict[str, Any]], Any] | None = None) -> bool:
    """Replace the channel's BRPOP handler with one that also bulk-pops; False if not Redis.

    ``receiver_for(payload)`` may return a callable that takes the popped message (a kombu
    ``Message``) directly, skipping kombu's and Celery's per-message dispatch; where it returns
    None the message takes kombu's own path.
    """
    if (kombu_redis is None or not isinstance(channel, kombu_redis.Channel)
            or channel.global_keyprefix or "BRPOP" not in getattr(channel, "handlers", {})):
        return False
    script = channel.client.register_script(_POP_AND_TRACK)

    def brpop_read(**options: Any) -> bool:
        # Mirrors kombu.transport.redis.Channel._brpop_read, then pops more of the same queue.
        try:
            try:
                dest_item = channel.client.parse_response(channel.client.connection, "BRPOP",
                                                          **options)
            except channel.connection_errors:
                channel.client.connection.disconnect()
                raise
            if not dest_item:
                raise Empty()
            dest, item = dest_item
            dest = bytes_to_str(dest).rsplit(channel.sep, 1)[0]
            channel._queue_cycle.rotate(dest)
            channel.connection._deliver(_decode(bytes_to_str(item)), dest)
        finally:
            channel._in_poll = None  # type: ignore[assignment]  # kombu's hint says bool; it stores None
            flush_reauth = getattr(channel, "_flush_brpop_reauth", None)
            if flush_reauth is not None:
                flush_reauth()
        _deliver_more(channel, script, dest, receiver_for)
        return True

    channel.handlers["BRPOP"] = brpop_read
    return True


def guard_close(channel: Any) -> None:
    """Let the channel close when its broker is gone, instead of making the worker exit.

    kombu's Redis ``Channel.close`` first reads the reply of a BRPOP in flight
    (``_brpop_read``), expecting ``Empty``. With the server gone that read raises a connection
    error, before the channel is marked closed and before ``QoS.restore_unacked_once``: the
    channel stays open. Celery 5.7's ``Consumer.on_connection_error_after_connected`` runs
    ``connection.collect()`` (which swallows that error, drops the transport's ``client`` and
    keeps ``_default_channel``; a second channel raising aborts ``close_connection`` before it
    gets to this one), then ``connection.close()``: this channel's close runs again, tries the
    restore and dies in ``Channel._connparams`` (``self.connection.client`` is None) with an
    AttributeError that no one catches -- "Unrecoverable error", the worker exits. Plain Celery
    tasks hit it too; a batching worker more often, since it keeps a BRPOP waiting while a batch
    of unacknowledged messages runs.

    Here a connection error while the channel is closing counts as no reply: the close goes on
    and tries the restore while the transport can still connect (with the server down that fails
    and the messages stay in the unacked hash, restored after ``visibility_timeout``).
    """
    if (kombu_redis is None or not isinstance(channel, kombu_redis.Channel)
            or "_brpop_read" in vars(channel)):  # not Redis, or guarded already
        return
    read = channel._brpop_read

    def brpop_read(**options: Any) -> Any:
        try:
            return read(**options)
        except channel.connection_errors:
            if not getattr(channel, "_closing", False):
                raise
            raise Empty() from None

    channel._brpop_read = brpop_read  # type: ignore[method-assign]  # this channel's only


def _deliver_more(channel: Any, script: Any, queue: str,
                  receiver_for: Callable[[dict[str, Any]], Any] | None) -> None:
    qos = channel.qos
    if not qos.can_consume():  # the prefetch count, and Celery's worker_disable_prefetch rule
        return
    free = qos.can_consume_max_estimate()
    n = BULK_FETCH_MAX if free is None else min(free, BULK_FETCH_MAX)
    if n <= 0:
        return
    keys = [channel.unacked_key, channel.unacked_index_key,
            *(channel._q_for_pri(queue, pri) for pri in channel.priority_steps)]
    raws = script(keys=keys, args=[n, time.time(), BULK_FETCH_MAX_BYTES], client=channel.client)
    if not raws:
        return
    # The script already wrote what kombu's QoS.append writes to Redis: keep only its in-memory part.
    qos.append = in_memory_append = functools.partial(VirtualQoS.append, qos)
    consumed = queue in channel.connection._callbacks
    Message = channel.Message
    error: BaseException | None = None
    payloads = _decode_many(raws)
    try:
        for i, raw in enumerate(raws):
            try:
                payload = payloads[i] if payloads is not None else _decode(raw)
                receive = receiver_for(payload) if receiver_for is not None and consumed else None
                if receive is None:
                    channel.connection._deliver(payload, queue)
                else:  # kombu's virtual Channel.basic_consume._callback, then the strategy
                    message = Message(payload, channel=channel)
                    in_memory_append(message, message.delivery_tag)
                    receive(message)
            except Exception as exc:  # deliver the rest; a failed one stays unacked -> restored
                error = error or exc
    finally:
        del qos.append
    if error is not None:
        raise error


def ack_many(messages: Sequence[Any], connection_errors: tuple[type[BaseException], ...] = ()) -> None:
    """Acknowledge many messages; on kombu's Redis transport in one round trip.

    kombu's Redis ``QoS.ack`` runs one pipeline (``ZREM`` + ``HDEL`` of the unacked records,
    ``QoS._remove_from_indices``) per message; this removes all the batch's records with one
    ``ZREM`` and one ``HDEL``, then does the in-memory rest of ``QoS.ack`` and ``Message.ack``.
    Other transports (AMQP acks cost no round trip) ack each message as Celery does.
    """
    pending = [m for m in messages if not m.acknowledged]
    if not pending:
        return
    channel = pending[0].channel
    qos = getattr(channel, "qos", None)
    if (kombu_redis is None or not isinstance(qos, kombu_redis.QoS)
            or any(m.channel is not channel for m in pending)):
        for m in pending:
            m.ack_log_error(logger, connection_errors)
        return
    tags = [m.delivery_tag for m in pending]
    try:
        with channel.conn_or_acquire() as client, client.pipeline(transaction=False) as pipe:
            pipe.zrem(channel.unacked_index_key, *tags)
            pipe.hdel(channel.unacked_key, *tags)
            pipe.execute()
    except Exception:  # connection trouble: let each ack try (and log) on its own
        for m in pending:
            m.ack_log_error(logger, connection_errors)
        return
    for m in pending:
        VirtualQoS.ack(qos, m.delivery_tag)
        m._state = "ACK"


_json = JSONEncoder()  # kombu.utils.json.dumps builds this same encoder on every call
_json_str = json.encoder.encode_basestring_ascii


def _text(body: Any) -> str:
    return body.decode() if isinstance(body, bytes) else body


class _Splicer:
    """A kombu Redis message encoded once, with marked fields to fill in per message.

    ``dumps`` of a message dict costs an encoder set-up and a walk of every header; bulk
    messages differ only in a few strings. The template is built by kombu's own
    ``prepare_message`` and ``_inplace_augment_message``, its marked string fields become gaps,
    and each message is the template's fragments joined with its own (JSON-encoded) values: the
    same JSON document kombu would write (``tests/test_internals.py`` checks it, decoded, against
    kombu's own encoding).
    """

    def __init__(self, message: dict[str, Any], fields: Sequence[str]) -> None:
        text = dumps(message)
        marks = {json.dumps("\x00" + f): f for f in fields}
        found = sorted((text.index(mark), mark) for mark in marks)
        self.fragments: list[str] = []
        self.fields: list[str] = []
        pos = 0
        for at, mark in found:
            self.fragments.append(text[pos:at])
            self.fields.append(marks[mark])
            pos = at + len(mark)
        self.tail = text[pos:]

    @staticmethod
    def mark(field: str) -> str:
        return "\x00" + field

    def fill(self, values: dict[str, str]) -> str:
        """``values``: each field's JSON-encoded value."""
        out = []
        for fragment, field in zip(self.fragments, self.fields):
            out.append(fragment)
            out.append(values[field])
        out.append(self.tail)
        return "".join(out)


class RedisBulkPublisher:
    """Publish many task messages (and their ``task-sent`` events) to one queue in pipelines.

    Mirrors what ``Producer._publish`` -> ``virtual.Channel.basic_publish`` -> Redis
    ``Channel._put`` (task messages, default exchange) and ``Channel._put_fanout`` (events) do
    (kombu 5.5-5.7), with each message spliced from a template (``_Splicer``) instead of routed,
    augmented and encoded one by one.

    Each pipeline is written once on a connection of its own, never retried: redis-py retries a
    pipeline whose connection broke, which would push the messages that had already arrived a
    second time. A broken pipeline raises :class:`BulkPublishError` saying how many messages were
    surely sent and how many may or may not have been (kombu's ``PublishBatch`` takes the same
    stance: it refuses to batch where the client retries).
    """

    def __init__(self, channel: Any, queue: str, flush_every: int = 1000) -> None:
        self.channel = channel
        self.queue = queue
        self.flush_every = flush_every
        self._client_cm = channel.conn_or_acquire()
        self.client = self._client_cm.__enter__()
        self.commands: list[tuple[Any, ...]] = []
        self.sent = 0
        self._task: tuple[_Splicer, str, Any, str] | None = None
        self._event: tuple[_Splicer, list[str]] | None = None
        self._event_body: _Splicer

    @classmethod
    def for_channel(cls, channel: Any, queue: str) -> RedisBulkPublisher | None:
        """A publisher, or None where kombu's own path must run (prefixes, queue TTLs)."""
        if (kombu_redis is None or not isinstance(channel, kombu_redis.Channel)
                or channel.global_keyprefix or queue in (getattr(channel, "_expires", None) or {})):
            return None
        return cls(channel, queue)

    def set_task_template(self, priority: int | None, content_type: str, content_encoding: str,
                          headers: dict[str, Any], properties: dict[str, Any],
                          embed: dict[str, Any]) -> None:
        """The message every task shares; per message: id, argsrepr, kwargsrepr, body."""
        channel, mark = self.channel, _Splicer.mark
        headers = {**headers, "id": mark("id"), "root_id": mark("root_id"),
                   "argsrepr": mark("argsrepr"), "kwargsrepr": mark("kwargsrepr")}
        properties = {**properties, "correlation_id": mark("correlation_id")}
        message = channel.prepare_message(mark("body"), priority, content_type, content_encoding,
                                          headers, properties)
        channel._inplace_augment_message(message, "", self.queue)
        encoding = message["properties"]["body_encoding"]
        message["body"] = mark("body")
        message["properties"]["delivery_tag"] = mark("delivery_tag")
        splicer = _Splicer(message, ["id", "root_id", "argsrepr", "kwargsrepr", "correlation_id",
                                     "body", "delivery_tag"])
        key = channel._q_for_pri(self.queue, channel._get_message_priority(message, reverse=False))
        self._task = (splicer, key, encoding, ", " + _json.encode(embed) + "]")

    def publish_task(self, task_id: str, args: Any, kwargs: Any, argsrepr: str,
                     kwargsrepr: str, delivery_tag: str) -> None:
        """One task message (JSON body ``[args, kwargs, embed]``), as ``Channel._put`` writes it."""
        assert self._task is not None
        splicer, key, encoding, embed_tail = self._task
        body = "[" + _json.encode(args) + ", " + _json.encode(kwargs) + embed_tail
        quoted_id = '"' + task_id + '"'
        self.commands.append(("LPUSH", key, splicer.fill({
            "id": quoted_id, "root_id": quoted_id, "correlation_id": quoted_id,
            "argsrepr": _json_str(argsrepr), "kwargsrepr": _json_str(kwargsrepr),
            "body": _json_str(_text(self.channel.encode_body(body.encode(), encoding)[0])),
            "delivery_tag": '"' + delivery_tag + '"'})))
        if len(self.commands) >= self.flush_every:
            self.flush()

    def set_event_template(self, exchange: str, routing_key: str, content_type: str,
                           content_encoding: str, headers: dict[str, Any], delivery_mode: Any,
                           event: dict[str, Any]) -> None:
        """The ``task-sent`` events: ``event`` is one event (Celery's ``_prepare_event``) whose
        ``uuid``, ``root_id``, ``args``, ``kwargs``, ``clock`` and ``timestamp`` change per
        message; the envelope goes to the fanout exchange ``exchange``."""
        channel, mark = self.channel, _Splicer.mark
        event_fields = ["uuid", "root_id", "args", "kwargs", "clock", "timestamp"]
        self._event_body = _Splicer({**event, **{f: mark(f) for f in event_fields}}, event_fields)
        message = channel.prepare_message(mark("body"), 0, content_type, content_encoding,
                                          dict(headers), {"delivery_mode": delivery_mode})
        channel._inplace_augment_message(message, exchange, routing_key)
        message["body"] = mark("body")
        message["properties"]["delivery_tag"] = mark("delivery_tag")
        topics_of = getattr(channel, "_get_publish_topics", None)  # kombu >= 5.7
        topics = (topics_of(exchange, routing_key) if topics_of is not None
                  else [channel._get_publish_topic(exchange, routing_key)])
        self._event = (_Splicer(message, ["body", "delivery_tag"]), topics)

    def publish_event(self, task_id: str, argsrepr: str, kwargsrepr: str, clock: int,
                      timestamp: float, delivery_tag: str) -> None:
        """One ``task-sent`` event, as ``Channel._put_fanout`` publishes it."""
        assert self._event is not None
        splicer, topics = self._event
        quoted_id = '"' + task_id + '"'
        event = self._event_body.fill({
            "uuid": quoted_id, "root_id": quoted_id, "args": _json_str(argsrepr),
            "kwargs": _json_str(kwargsrepr), "clock": str(clock), "timestamp": repr(timestamp)})
        body = _text(self.channel.encode_body(event.encode(), self.channel.body_encoding)[0])
        payload = splicer.fill({"body": _json_str(body), "delivery_tag": '"' + delivery_tag + '"'})
        for topic in topics:
            self.commands.append(("PUBLISH", topic, payload))

    def add_command(self, *args: Any) -> None:
        """Another command for the current pipeline."""
        self.commands.append(args)

    def flush(self) -> None:
        commands, self.commands = self.commands, []
        if not commands:
            return
        pool = self.client.connection_pool
        try:
            conn = pool.get_connection()
        except TypeError:  # redis-py < 5.3 wants a command name
            conn = pool.get_connection("LPUSH")
        try:
            conn.send_packed_command(conn.pack_commands(commands), check_health=False)
            for _ in commands:
                conn.read_response()
        except Exception as exc:
            conn.disconnect()
            lpushes = sum(1 for c in commands if c[0] == "LPUSH")
            raise BulkPublishError(
                f"bulk submit to {self.queue!r} broke off ({type(exc).__name__}: {exc}): "
                f"{self.sent} message(s) were sent, the next {lpushes} may or may not have "
                f"been, the rest were not. Retrying the uncertain ones may run them twice.",
                sent=self.sent, uncertain=lpushes) from exc
        finally:
            pool.release(conn)
        self.sent += sum(1 for c in commands if c[0] == "LPUSH")

    def close(self) -> None:
        self.commands = []
        self._client_cm.__exit__(None, None, None)
