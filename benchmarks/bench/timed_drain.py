"""A timed drain: a queue pre-loaded with messages, one worker started on it, every result
waited for and checked (drain, gpusim, and latency's fallback throughput measurement)."""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .common import log
from .config import Config
from .cpu import CPU_LABEL, ProcessCpu, find_redis_server, fmt_cpu
from .results import date_done_ts, fetch_results, redis_client, verify_results, wait_for_results
from .senders import RawEnqueuer, sender_app
from .workers import Worker, batching_stats, mean_batch, size_histogram


def drain_with_worker(cfg: Config, r: Any, *, label: str, app_module: str, queue: str,
                      ids: Sequence[str], expected: Sequence[Any],
                      check: Callable[[Any, Any], bool] | None = None,
                      decode: Callable[[bytes], Any] = json.loads, stats: tuple[Any, str] | None = None,
                      python: Path | str = sys.executable, env: dict[str, str] | None = None
                      ) -> tuple[dict[str, Any], list[dict[str, Any] | None]]:
    """Start one worker on a queue that already holds ``ids``' messages and wait for every result.

    Checks every stored result (``check(result, expected)``, else equality). Rate = items / (last
    result's ``date_done`` − worker ready); CPU µs per item by process over that window;
    ``stats`` = (app, task name) for the batch sizes. Returns (numbers, the decoded metas).
    """
    n = len(ids)
    redis_proc = find_redis_server()
    worker = Worker(app_module, queue, label, cfg.redis_url, python=python, env=env).start()
    try:
        cpu = ProcessCpu(worker, redis_proc)
        done = wait_for_results(r, ids, timeout=cfg.drain_timeout, worker=worker)
        cpu_us = cpu.per_item(n)
        batch_stats = batching_stats(stats[0], worker.hostname, stats[1]) if stats else None
        unacked = r.hlen("unacked")
    finally:
        worker.stop()
    metas = fetch_results(r, ids, decode=decode)
    verify_results(label, metas, ids, expected, check)
    stamps = [date_done_ts(m) for m in metas if m]
    assert worker.ready_at is not None
    first, last = min(stamps), max(stamps)
    out = {
        "n": n, "done": done,
        "seconds": last - worker.ready_at,
        "rate": n / (last - worker.ready_at),
        # Items stored after the first store (a batch's results share one date_done).
        "rate_from_first": (sum(1 for x in stamps if x > first) / (last - first) if last > first
                            else float("nan")),
        "first_result_ms": (first - worker.ready_at) * 1000,
        "mean_batch": mean_batch(batch_stats),
        "histogram": size_histogram(batch_stats),
        "flush_reasons": (batch_stats or {}).get("flush_reasons"),
        "unacked_after": unacked,
        "cpu_us": cpu_us,  # the window includes this process's polling and Redis answering it
    }
    extra = (f", mean batch {out['mean_batch']:.1f} ({out['histogram']})"
             if out["mean_batch"] else "")
    log(f"  {label}: {n:,} results in {out['seconds']:.2f}s from worker-ready -> "
        f"{out['rate']:,.0f} items/s (from first result: {out['rate_from_first']:,.0f}/s; "
        f"first result after {out['first_result_ms']:.0f} ms){extra}; {CPU_LABEL}: {fmt_cpu(cpu_us)}")
    return out, metas


def drain_once(cfg: Config, label: str, app_module: str, task_name: str, n: int,
               python: Path | str = sys.executable, stats_app: Any = None) -> dict[str, Any]:
    """``n`` add(x, y) messages pre-loaded with a raw pipeline (not timed), then one worker."""
    r = redis_client(cfg.redis_url)
    r.flushdb()
    queue = f"bench.drain.{label}"
    ids = [str(uuid.uuid4()) for _ in range(n)]
    args = [(i, 2 * i + 1) for i in range(n)]
    t = time.perf_counter()
    RawEnqueuer(sender_app(cfg.redis_url), task_name, r).push(r, queue, ids, args)
    assert r.llen(queue) == n, f"enqueued {r.llen(queue)} of {n}"
    log(f"  {label}: {n:,} messages enqueued ({time.perf_counter() - t:.1f}s, not timed); starting worker")
    out, _ = drain_with_worker(cfg, r, label=f"drain-{label}", app_module=app_module, queue=queue,
                               ids=ids, expected=[x + y for x, y in args], python=python,
                               stats=(stats_app, task_name) if stats_app else None)
    r.flushdb()
    r.close()
    return out
