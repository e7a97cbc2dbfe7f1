"""Where celery_batched reaches into Celery's Redis result backend: a batch in one round trip.

``RedisBackend.set`` costs a MULTI/EXEC pipeline (``SETEX`` + ``PUBLISH``) per task after a
``GET`` for the duplicate guard: three round trips' worth of client work per item. ``store`` runs
one Lua script per batch that does, per item, what ``BaseKeyValueStoreBackend._store_result``
and ``RedisBackend._set`` do: skip the item if a SUCCESS is already stored (a duplicate
delivery), else ``SET`` with the backend's expiry and ``PUBLISH`` to wake ``AsyncResult.get``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

from kombu.utils.json import object_hook

from . import trace

logger = logging.getLogger(__name__)

try:
    from celery.backends.redis import RedisBackend
except ImportError:  # pragma: no cover
    RedisBackend = None

try:  # Celery >= 5.7 marks compressed results (result_compression)
    from celery.backends.base import COMPRESSED_PAYLOAD_MAGIC as _COMPRESSED
except ImportError:  # pragma: no cover
    _COMPRESSED = b"\x00never-a-prefix\x00"

#: Keys per script call at most (one call holds Redis for its duration).
MAX_KEYS_PER_CALL = 1000

# KEYS: the result keys. ARGV[1]: expiry in seconds (0: none). ARGV[2]: 'json' or 'msgpack'
# (the guard decodes a stored meta with it) or '' (the caller already checked). ARGV[3..]: metas.
_STORE = """
local ttl = tonumber(ARGV[1])
local codec = ARGV[2]
local written = 0
for i = 1, #KEYS do
  local skip = false
  if codec ~= '' then
    local cur = redis.call('GET', KEYS[i])
    if cur then
      local ok, meta
      if codec == 'json' then ok, meta = pcall(cjson.decode, cur)
      else ok, meta = pcall(cmsgpack.unpack, cur) end
      skip = ok and type(meta) == 'table' and meta['status'] == 'SUCCESS'
    end
  end
  if not skip then
    if ttl > 0 then redis.call('SET', KEYS[i], ARGV[i + 2], 'EX', ttl)
    else redis.call('SET', KEYS[i], ARGV[i + 2]) end
    redis.call('PUBLISH', KEYS[i], ARGV[i + 2])
    written = written + 1
  end
end
return written
"""

_scripts: dict[int, Any] = {}


def can_store(backend: Any) -> bool:
    """Whether the worker's main process can store SUCCESS metas for this backend in bulk."""
    return (RedisBackend is not None and isinstance(backend, RedisBackend)
            and not backend.app.conf.find_value_for_key("extended", "result"))


def task_keys(backend: Any, task_ids: Sequence[str]) -> list[Any]:
    """``backend.get_key_for_task`` of each id, with the prefix joined once: mirrors
    ``BaseKeyValueStoreBackend.get_key_for_task`` / ``_get_key_for`` (prefix + ``key_t(id)``)."""
    if not all(task_ids):
        raise ValueError(f"task_id must not be empty. Got {list(task_ids)!r}")
    prefix, key_t = backend.task_keyprefix, backend.key_t
    return [prefix + key_t(task_id) for task_id in task_ids]


def store(backend: Any, task_ids: Sequence[str], metas: Sequence[Any]) -> int:
    """Store encoded SUCCESS metas; return how many were written (duplicates are skipped).

    Connection errors and refused writes are retried with the backend's retry policy
    (``RedisBackend.ensure``, as ``RedisBackend.set`` does, and ``trace.write_retried``), then
    raised. A server that refuses scripts gets pipelined writes instead.
    """
    keys = task_keys(backend, task_ids)
    readable = backend.serializer in ("json", "msgpack") and not getattr(backend, "compression", None)
    codec = backend.serializer if readable else ""
    ttl = int(backend.expires or 0)
    return int(trace.write_retried(backend, backend.ensure, _store,
                                   (backend, keys, list(metas), codec, ttl)))


def _store(backend: Any, keys: list[Any], metas: list[Any], codec: str, ttl: int) -> int:
    client = backend.client
    if not codec:  # a serializer Lua can't read: the duplicate guard runs here
        keys, metas = _not_yet_succeeded(backend, keys, metas)
    script = _scripts.get(id(client))
    if script is None:
        script = _scripts[id(client)] = client.register_script(_STORE)
    written = 0
    for start in range(0, len(keys), MAX_KEYS_PER_CALL):
        end = start + MAX_KEYS_PER_CALL
        if script is _NO_SCRIPTS:
            written += _store_pipelined(backend, keys[start:end], metas[start:end], codec, ttl)
            continue
        try:
            written += script(keys=keys[start:end], args=[ttl, codec, *metas[start:end]],
                              client=client)
        except Exception as exc:
            if not scripts_refused(exc):
                raise
            logger.warning("celery_batched: the result backend refuses Lua scripts (%s: %s); "
                           "storing results with pipelined SET + PUBLISH from now on",
                           type(exc).__name__, exc)
            script = _scripts[id(client)] = _NO_SCRIPTS
            written += _store_pipelined(backend, keys[start:end], metas[start:end], codec, ttl)
    return written


def _not_yet_succeeded(backend: Any, keys: list[Any],
                       metas: list[Any]) -> tuple[list[Any], list[Any]]:
    """The keys (and their metas) with no SUCCESS stored yet, on one ``MGET``: the duplicate
    guard of ``BaseKeyValueStoreBackend._store_result``."""
    current = backend.client.mget(keys)
    keep = [k for k, cur in enumerate(current)
            if not (cur and backend.decode_result(cur).get("status") == "SUCCESS")]
    return [keys[k] for k in keep], [metas[k] for k in keep]


_NO_SCRIPTS: Any = object()


def scripts_refused(exc: BaseException) -> bool:
    """The server won't run the script at all: EVAL/EVALSHA renamed away, or an ACL without
    ``@scripting`` -- not a refusal of the writes themselves (OOM, READONLY: those stay
    errors)."""
    from redis import exceptions as redis_errors

    if not isinstance(exc, redis_errors.ResponseError):
        return False
    text = str(exc).lower()
    if isinstance(exc, redis_errors.NoPermissionError):
        return any(word in text for word in ("'evalsha'", "'eval'", "'script", "script|"))
    return text.startswith("unknown command") and any(
        word in text for word in ("'evalsha'", "'eval'", "'script'"))


def _store_pipelined(backend: Any, keys: list[Any], metas: list[Any], codec: str,
                     ttl: int) -> int:
    """What the script does, for a server that runs no scripts: the duplicate guard on one
    ``MGET``, then one pipeline of ``SET`` + ``PUBLISH`` per item (``RedisBackend._set``
    without its MULTI/EXEC; the guard and the write are not atomic here, as in Celery's own
    ``_store_result``)."""
    client = backend.client
    if codec:  # not checked by the caller yet
        keys, metas = _not_yet_succeeded(backend, keys, metas)
    with client.pipeline(transaction=False) as pipe:
        for key, meta in zip(keys, metas):
            if ttl:
                pipe.set(key, meta, ex=ttl)
            else:
                pipe.set(key, meta)
            pipe.publish(key, meta)
        pipe.execute()
    return len(keys)


def can_read(backend: Any) -> bool:
    """Whether ``read`` can fetch this backend's results in bulk."""
    return RedisBackend is not None and isinstance(backend, RedisBackend)


_plain_json = json.JSONDecoder().decode
_hooked_json = json.JSONDecoder(object_hook=object_hook).decode


def read(backend: Any, task_ids: Sequence[str]) -> list[dict[str, Any] | None]:
    """The stored meta of each task (None where nothing is stored), with ``MGET`` in chunks.

    Mirrors ``Backend.decode_result`` (``decode`` + ``meta_from_decoded``); JSON metas are decoded
    with one decoder kept for the process (``kombu.utils.json.loads`` builds one per call).
    """
    client = backend.client
    keys = task_keys(backend, task_ids)
    fast_json = (backend.serializer == "json" and "application/json" in (backend.accept or ())
                 and backend.content_type == "application/json")
    out: list[dict[str, Any] | None] = []
    for start in range(0, len(keys), MAX_KEYS_PER_CALL):
        for raw in client.mget(keys[start:start + MAX_KEYS_PER_CALL]):
            if raw is None:
                out.append(None)
            elif fast_json and not raw.startswith(_COMPRESSED):
                text = raw.decode() if isinstance(raw, bytes) else raw
                meta = _hooked_json(text) if '"__type__"' in text else _plain_json(text)
                out.append(backend.meta_from_decoded(meta))
            else:
                out.append(backend.decode_result(raw))
    return out
