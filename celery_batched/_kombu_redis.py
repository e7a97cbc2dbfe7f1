"""Where celery_batched reaches into kombu's Redis transport (kombu 5.5-5.7): fewer round trips.

Per message, kombu's Redis transport costs three round trips: a BRPOP, a pipeline recording the
message as unacknowledged (``QoS.append``), and a pipeline removing that record on ack
(``QoS.ack``). The profile of a draining worker shows those round trips, not Python, as its cost.

* ``install_bulk_fetch``: after each BRPOP, one Lua script pops up to the free prefetch slots
  from the same queue and records every popped message in kombu's unacked hash and index, the
  same records ``QoS.append`` writes -- atomically, so a crash can't lose a popped message: it is
  restored after ``visibility_timeout`` like any unacknowledged message.
* ``ack_many``: the acknowledgements of a batch in one pipeline.
* ``RedisBulkPublisher``: bulk submit's messages in LPUSH pipelines.
"""

from __future__ import annotations

import functools
import logging
import time
from queue import Empty  # what kombu's Redis _brpop_read raises for an empty reply
from collections.abc import Sequence
from typing import Any

logger = logging.getLogger(__name__)

try:
    from kombu.transport import redis as kombu_redis
    from kombu.transport.virtual.base import QoS as VirtualQoS
    from kombu.utils.encoding import bytes_to_str
    from kombu.utils.json import dumps, loads
except ImportError:  # pragma: no cover
    kombu_redis = None  # type: ignore[assignment]

#: Messages popped per script call at most, whatever the prefetch allows.
BULK_FETCH_MAX = 256

# KEYS: unacked hash, unacked index, then the queue's lists by priority (BRPOP's order).
# ARGV: how many to pop, now. The hash value is kombu's ``dumps([raw_message, exchange,
# routing_key])``, assembled around the raw JSON text so the message is stored byte for byte.
_POP_AND_TRACK = """
local function js(v) if v == nil then return 'null' end return cjson.encode(v) end
local out = {}
local n = tonumber(ARGV[1])
for k = 3, #KEYS do
  while #out < n do
    local raw = redis.call('RPOP', KEYS[k])
    if not raw then break end
    local props = cjson.decode(raw)['properties']
    local info = props['delivery_info'] or {}
    local tag = props['delivery_tag']
    redis.call('ZADD', KEYS[2], ARGV[2], tag)
    redis.call('HSET', KEYS[1], tag, '[' .. raw .. ', ' .. js(info['exchange']) .. ', ' .. js(info['routing_key']) .. ']')
    out[#out + 1] = raw
  end
end
return out
"""


def install_bulk_fetch(channel: Any) -> bool:
    """Replace the channel's BRPOP handler with one that also bulk-pops; False if not Redis."""
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
            channel.connection._deliver(loads(bytes_to_str(item)), dest)
        finally:
            channel._in_poll = None  # type: ignore[assignment]  # kombu's hint says bool; it stores None
            flush_reauth = getattr(channel, "_flush_brpop_reauth", None)
            if flush_reauth is not None:
                flush_reauth()
        _deliver_more(channel, script, dest)
        return True

    channel.handlers["BRPOP"] = brpop_read
    return True


def _deliver_more(channel: Any, script: Any, queue: str) -> None:
    qos = channel.qos
    free = qos.can_consume_max_estimate()
    n = BULK_FETCH_MAX if free is None else min(free, BULK_FETCH_MAX)
    if n <= 0:
        return
    keys = [channel.unacked_key, channel.unacked_index_key,
            *(channel._q_for_pri(queue, pri) for pri in channel.priority_steps)]
    raws = script(keys=keys, args=[n, time.time()], client=channel.client)
    if not raws:
        return
    # The script already wrote what kombu's QoS.append writes to Redis: keep only its in-memory part.
    qos.append = functools.partial(VirtualQoS.append, qos)
    error: BaseException | None = None
    try:
        for raw in raws:
            try:
                channel.connection._deliver(loads(bytes_to_str(raw)), queue)
            except Exception as exc:  # deliver the rest; a failed one stays unacked -> restored
                error = error or exc
    finally:
        del qos.append
    if error is not None:
        raise error


def ack_many(requests: Sequence[Any]) -> None:
    """Acknowledge many requests' messages; on kombu's Redis transport in one round trip.

    kombu's Redis ``QoS.ack`` runs one pipeline (ZREM + HDEL of the unacked records) per
    message; this runs one pipeline for all, then the in-memory rest of ``QoS.ack`` and what
    ``Message.ack`` / ``Request.acknowledge`` record, so those stay no-ops afterwards. Other
    transports (AMQP acks cost no round trip) use ``Request.acknowledge`` as usual.
    """
    pending = [req for req in requests if not req.acknowledged]
    if not pending:
        return
    messages = [req._message for req in pending]
    channel = messages[0].channel
    qos = getattr(channel, "qos", None)
    if (kombu_redis is None or not isinstance(qos, kombu_redis.QoS)
            or any(m.channel is not channel or m.acknowledged for m in messages)):
        for req in pending:
            req.acknowledge()
        return
    try:
        with channel.conn_or_acquire() as client, client.pipeline(transaction=False) as pipe:
            for m in messages:
                qos._remove_from_indices(m.delivery_tag, pipe)
            pipe.execute()
    except Exception:  # connection trouble: let each ack try (and log) on its own
        for req in pending:
            req.acknowledge()
        return
    for req, m in zip(pending, messages):
        VirtualQoS.ack(qos, m.delivery_tag)
        m._state = "ACK"
        req.acknowledged = True


class RedisBulkPublisher:
    """Publish many messages to one queue in Redis pipelines of ``flush_every`` LPUSHes.

    Mirrors what ``Producer._publish`` -> ``virtual.Channel.basic_publish`` -> Redis
    ``Channel._put`` do for the default exchange (kombu 5.5-5.7): ``prepare_message``,
    ``_inplace_augment_message`` (body encoding, delivery tag and info), then LPUSH onto the
    queue's list for the message's priority -- without the per-message routing and dispatch.
    """

    def __init__(self, channel: Any, queue: str, flush_every: int = 1000) -> None:
        self.channel = channel
        self.queue = queue
        self.flush_every = flush_every
        self._client_cm = channel.conn_or_acquire()
        self.pipe = self._client_cm.__enter__().pipeline(transaction=False)
        self.pending = 0

    @classmethod
    def for_channel(cls, channel: Any, queue: str) -> RedisBulkPublisher | None:
        """A publisher, or None where kombu's own path must run (prefixes, queue TTLs)."""
        if (kombu_redis is None or not isinstance(channel, kombu_redis.Channel)
                or channel.global_keyprefix or queue in (channel._expires or {})):
            return None
        return cls(channel, queue)

    def publish(self, body: Any, priority: int | None, content_type: str, content_encoding: str,
                headers: dict[str, Any], properties: dict[str, Any]) -> None:
        channel = self.channel
        message = channel.prepare_message(body, priority, content_type, content_encoding,
                                          headers, properties)
        channel._inplace_augment_message(message, "", self.queue)
        key = channel._q_for_pri(self.queue, channel._get_message_priority(message, reverse=False))
        self.pipe.lpush(key, dumps(message))
        self.pending += 1
        if self.pending >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.pipe.execute()
            self.pending = 0

    def close(self) -> None:
        self.pipe.reset()
        self._client_cm.__exit__(None, None, None)
