"""Results in the Redis backend: count, fetch, decode and verify them, wait until they are stored."""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from .common import CorrectnessError, log

if TYPE_CHECKING:
    from .workers import Worker

RESULT_PREFIX = "celery-task-meta-"


def redis_client(url: str) -> Any:
    import redis

    return redis.Redis.from_url(url)


def result_keys(ids: Sequence[str]) -> list[str]:
    return [RESULT_PREFIX + i for i in ids]


def count_results(r: Any, ids: Sequence[str], chunk: int = 10_000) -> int:
    keys = result_keys(ids)
    total = 0
    with r.pipeline(transaction=False) as pipe:
        for i in range(0, len(keys), chunk):
            pipe.exists(*keys[i:i + chunk])
        for n in pipe.execute():
            total += n
    return total


def decoder(serializer: str) -> Callable[[bytes], Any]:
    """How a stored result meta is decoded, for the worker's ``result_serializer``."""
    if serializer == "msgpack":
        import msgpack

        return lambda raw: msgpack.unpackb(raw, raw=False)
    if serializer != "json":
        raise ValueError(f"no decoder for result_serializer {serializer!r}")
    return json.loads


def fetch_results(r: Any, ids: Sequence[str], chunk: int = 5_000,
                  decode: Callable[[bytes], Any] = json.loads) -> list[dict[str, Any] | None]:
    keys = result_keys(ids)
    out: list[dict[str, Any] | None] = []
    for i in range(0, len(keys), chunk):
        for raw in r.mget(keys[i:i + chunk]):
            out.append(decode(raw) if raw is not None else None)
    return out


def date_done_ts(meta: dict[str, Any]) -> float:
    return dt.datetime.fromisoformat(meta["date_done"]).timestamp()


def verify_results(what: str, metas: Sequence[dict[str, Any] | None], ids: Sequence[str],
                   expected: Sequence[Any], check: Callable[[Any, Any], bool] | None = None) -> None:
    """Every id has a SUCCESS result equal to its expected value, else CorrectnessError."""
    missing, wrong, bad_state = [], [], []
    for tid, meta, exp in zip(ids, metas, expected):
        if meta is None:
            missing.append(tid)
        elif meta.get("status") != "SUCCESS":
            bad_state.append((tid, meta.get("status"), str(meta.get("result"))[:200]))
        elif not (check(meta["result"], exp) if check else meta["result"] == exp):
            wrong.append((tid, str(meta["result"])[:80], str(exp)[:80]))
    if missing or wrong or bad_state:
        raise CorrectnessError(
            f"{what}: {len(ids)} items: {len(missing)} missing result(s), {len(bad_state)} not "
            f"SUCCESS, {len(wrong)} wrong value(s). First missing: {missing[:3]}; first not "
            f"SUCCESS: {bad_state[:2]}; first wrong (got, expected): {wrong[:3]}")


def wait_for_results(r: Any, ids: Sequence[str], timeout: float, worker: Worker | None = None,
                     interval: float = 0.05, stall: float = 60.0) -> int:
    """Poll until every result is stored; return how many are.

    Results arrive roughly in queue order, so each poll checks a window of keys from the first
    missing one (one EXISTS) instead of all of them, 64 keys at first and twice as many after
    each window found complete: the harness's own load on Redis and on its own CPU stays small,
    whatever the number of items and the rate, rather than competing with the worker under test.
    Gives up after ``timeout`` seconds, or after ``stall`` seconds without a new result (items
    a worker lost come back only after the broker's visibility timeout). Timings come from the
    results' own ``date_done``, not from this loop.
    """
    now = time.monotonic()
    deadline, last_progress = now + timeout, now
    keys = result_keys(ids)
    start, seen = 0, (-1, -1)
    while time.monotonic() < deadline:
        present, window = 0, 64
        while start < len(keys):
            chunk = keys[start:start + window]
            present = r.exists(*chunk)
            if present < len(chunk):
                break
            start += len(chunk)
            window = min(2 * window, 4096)
        if start >= len(keys):
            n = count_results(r, ids)  # every key, once, before declaring the drain done
            if n >= len(ids):
                return n
            start, present = 0, n
        if (start, present) != seen:
            seen, last_progress = (start, present), time.monotonic()
        elif time.monotonic() - last_progress > stall:
            n = count_results(r, ids)
            log(f"  no new result for {stall:.0f}s: {n:,} of {len(ids):,} stored; giving up")
            return n
        if worker is not None:
            worker.check_alive()
        time.sleep(interval)
    return count_results(r, ids)
