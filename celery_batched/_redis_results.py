"""Where celery_batched reaches into Celery's Redis result backend: a batch in one round trip.

``RedisBackend.set`` costs a MULTI/EXEC pipeline (``SETEX`` + ``PUBLISH``) per task after a
``GET`` for the duplicate guard: three round trips' worth of client work per item. ``store`` runs
one Lua script per batch that does, per item, what ``BaseKeyValueStoreBackend._store_result``
and ``RedisBackend._set`` do: skip the item if a SUCCESS is already stored (a duplicate
delivery), else ``SET`` with the backend's expiry and ``PUBLISH`` to wake ``AsyncResult.get``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

try:
    from celery.backends.redis import RedisBackend
except ImportError:  # pragma: no cover
    RedisBackend = None

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


def store(backend: Any, task_ids: Sequence[str], metas: Sequence[Any]) -> int:
    """Store encoded SUCCESS metas; return how many were written (duplicates are skipped).

    Connection errors are retried with the backend's retry policy (``RedisBackend.ensure``,
    as ``RedisBackend.set`` does), then raised.
    """
    keys = [backend.get_key_for_task(task_id) for task_id in task_ids]
    codec = backend.serializer if backend.serializer in ("json", "msgpack") else ""
    ttl = int(backend.expires or 0)
    return int(backend.ensure(_store, (backend, keys, list(metas), codec, ttl)))


def _store(backend: Any, keys: list[Any], metas: list[Any], codec: str, ttl: int) -> int:
    client = backend.client
    if not codec:  # a serializer Lua can't read: the duplicate guard runs here
        current = client.mget(keys)
        keep = [k for k, cur in enumerate(current)
                if not (cur and backend.decode_result(cur).get("status") == "SUCCESS")]
        keys, metas = [keys[k] for k in keep], [metas[k] for k in keep]
    script = _scripts.get(id(client))
    if script is None:
        script = _scripts[id(client)] = client.register_script(_STORE)
    written = 0
    for start in range(0, len(keys), MAX_KEYS_PER_CALL):
        end = start + MAX_KEYS_PER_CALL
        written += script(keys=keys[start:end], args=[ttl, codec, *metas[start:end]], client=client)
    return written
