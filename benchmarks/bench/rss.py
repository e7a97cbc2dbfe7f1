"""Section 6, ``rss``: the worker's memory (and unacked messages) over a large drain."""

from __future__ import annotations

import statistics
import time
import uuid

from .common import CorrectnessError, log
from .config import Config
from .report import Report, met
from .results import fetch_results, redis_client, verify_results
from .senders import RawEnqueuer, sender_app
from .workers import Worker, batching_stats


def section_rss(cfg: Config, rep: Report) -> None:
    n = cfg.rss_items
    log(f"== rss: worker memory while draining {n:,} items (cap {cfg.rss_cap_s:.0f}s) ==")
    from benchmarks.apps import bench_batched

    task = bench_batched.add
    r = redis_client(cfg.redis_url)
    r.flushdb()
    queue, staging = "bench.rss", "bench.rss.staging"
    w = Worker("benchmarks.apps.bench_batched", queue, "rss", cfg.redis_url).start()
    try:
        warm = [task.apply_async((i, i), queue=queue) for i in range(300)]
        for res in warm:
            res.get(timeout=30)
        time.sleep(1.0)
        idle_samples = []
        for _ in range(5):
            idle_samples.append(w.rss())
            time.sleep(0.3)
        idle = statistics.median(idle_samples)
        log(f"  idle RSS (main + pool child, after a 300-item warm-up): {idle / 2**20:.1f} MB")

        # Fill a staging list, then RENAME it onto the worker's queue: the drain starts at once.
        args = [(i, 5 * i) for i in range(n)]
        t = time.perf_counter()
        if hasattr(task, "starmap_items"):
            how = "starmap_items"
            ids: list[str] = []
            for i in range(0, n, 10_000):
                ids.extend(res.id for res in task.starmap_items(args[i:i + 10_000], queue=staging))
        else:
            how = "raw Redis pipeline (starmap_items not available)"
            ids = [str(uuid.uuid4()) for _ in range(n)]
            RawEnqueuer(sender_app(cfg.redis_url), task.name, r).push(r, staging, ids, args)
        enq_s = time.perf_counter() - t
        if r.llen(staging) != n:
            raise CorrectnessError(f"rss: staging queue holds {r.llen(staging)} of {n} messages")
        log(f"  enqueued {n:,} via {how} in {enq_s:.1f}s ({n / enq_s:,.0f}/s); draining")
        r.rename(staging, queue)
        t0 = time.monotonic()
        peak, max_unacked, samples = 0, 0, []
        left = n
        while True:
            w.check_alive()
            rss = w.rss()
            queued, unacked = r.llen(queue), r.hlen("unacked")
            left = queued + unacked
            peak, max_unacked = max(peak, rss), max(max_unacked, unacked)
            elapsed = time.monotonic() - t0
            samples.append((round(elapsed, 2), rss, queued, unacked))
            if len(samples) % 20 == 0:
                log(f"    t={elapsed:5.1f}s rss={rss / 2**20:6.1f} MB queued={queued:,} unacked={unacked}")
            if left == 0 or elapsed >= cfg.rss_cap_s:
                break
            time.sleep(0.5)
        elapsed = time.monotonic() - t0
        stats = batching_stats(bench_batched.app, w.hostname, task.name)
        final = w.rss()
    finally:
        w.stop()
    drained = n - left
    # Correctness: every stored result is right; all items are stored when the queue was
    # drained, else at least the drained ones less a window for what was in flight at the stop.
    metas = fetch_results(r, ids)
    present = [k for k, m in enumerate(metas) if m is not None]
    verify_results("rss drain", [metas[k] for k in present], [ids[k] for k in present],
                   [args[k][0] + args[k][1] for k in present])
    if len(present) < (n if left == 0 else drained - 2_000):
        raise CorrectnessError(f"rss drain: {drained:,} items left the queue but only "
                               f"{len(present):,} results are stored")
    r.flushdb()
    r.close()
    delta = peak - idle
    out = {"n": n, "drained": drained, "seconds": elapsed, "rate": drained / elapsed,
           "idle_mb": idle / 2**20, "peak_mb": peak / 2**20, "final_mb": final / 2**20,
           "delta_mb": delta / 2**20, "max_unacked": max_unacked, "enqueue": how,
           "held": stats and stats.get("held"), "samples": samples}
    rep.data["rss"] = out
    log(f"  drained {drained:,} of {n:,} in {elapsed:.1f}s ({out['rate']:,.0f}/s); RSS idle "
        f"{out['idle_mb']:.1f} MB, max {out['peak_mb']:.1f} MB (+{out['delta_mb']:.1f} MB), "
        f"max unacked {max_unacked}")
    rep.add(f"Worker RSS, drain of {drained:,}/{n:,} items in {elapsed:.0f}s: idle → max (MB)",
            f"{out['idle_mb']:.1f} → {out['peak_mb']:.1f} (+{out['delta_mb']:.1f})",
            target="≤ +50 MB", met=met(out["delta_mb"] <= 50))
    rep.add("Worker RSS drain: max unacked messages (HLEN unacked)", f"{max_unacked:,}",
            target="bounded (≈ 2×max_batch_size + prefetch)", met=met(max_unacked <= 1000))
