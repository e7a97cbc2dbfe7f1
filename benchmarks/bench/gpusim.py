"""Section 2, ``gpusim``: a simulated GPU model (a batched call that sleeps) with vector results,
msgpack vs json, against the model's own limit."""

from __future__ import annotations

import gc
import queue as queue_mod
import tempfile
import time
from pathlib import Path
from typing import Any

from .common import CorrectnessError, log
from .config import Config
from .cpu import CPU_LABEL, ProcessCpu, fmt_cpu
from .report import Report, fmt_rate, met
from .results import date_done_ts, decoder, fetch_results, redis_client
from .timed_drain import drain_with_worker
from .workers import Worker, batching_stats

GPUSIM_TARGETS = {"msgpack": 0.90, "json": 0.60, "live": 0.80, "shared": 0.95, "c2": 0.95}


def gpusim_run(cfg: Config, label: str, task_name: str, serializer: str) -> dict[str, Any]:
    """Pre-load ``gpusim_items`` items with ``map_items``, drain them with one worker, then time
    the client reading every result back (``ItemResults.get()``)."""
    from benchmarks.apps import bench_gpusim

    r = redis_client(cfg.redis_url)
    r.flushdb()
    client = bench_gpusim.make_app(serializer)  # decodes results with the worker's serializer
    task = client.tasks[task_name]
    queue = f"bench.gpusim.{label}"
    xs = list(range(cfg.gpusim_items))
    results = task.map_items(xs, queue=queue)
    ids = [res.id for res in results]
    env = {"BENCH_RESULT_SERIALIZER": serializer, "BENCH_GPUSIM_F_MS": str(cfg.gpusim_f_ms),
           "BENCH_GPUSIM_P_MS": str(cfg.gpusim_p_ms)}
    out, metas = drain_with_worker(
        cfg, r, label=f"gpusim-{label}", app_module="benchmarks.apps.bench_gpusim", queue=queue,
        ids=ids, expected=xs, check=lambda got, x: got == bench_gpusim.expected_row(x),
        decode=decoder(serializer), stats=(client, task_name), env=env)
    gc.collect()  # every timed client window starts from a collected heap (less variance)
    cpu = ProcessCpu(None)
    t = time.perf_counter()
    values = results.get(timeout=cfg.drain_timeout)
    get_s = time.perf_counter() - t
    out["get_cpu_us"] = cpu.per_item(len(ids))
    if values != [m["result"] for m in metas if m]:
        raise CorrectnessError(f"gpusim-{label}: ItemResults.get() returned values other than the "
                               f"stored results")
    out["get_rate"] = len(ids) / get_s
    log(f"  gpusim-{label}: ItemResults.get() of {len(ids):,} results: {get_s:.2f}s -> "
        f"{out['get_rate']:,.0f} results/s; {CPU_LABEL}: {fmt_cpu(out['get_cpu_us'])}")
    client.close()
    r.flushdb()
    r.close()
    return out


def section_gpusim(cfg: Config, rep: Report) -> None:
    from benchmarks.apps import bench_gpusim as g

    f_ms, p_ms, n, size = cfg.gpusim_f_ms, cfg.gpusim_p_ms, cfg.gpusim_items, g.MAX_BATCH_SIZE
    limit = size / ((f_ms + p_ms * size) / 1000.0)
    log(f"== gpusim: {n:,} items through a simulated GPU model (sleeps {f_ms:g} + {p_ms:g} ms/item "
        f"per call; max_batch_size {size}, wait_ms {g.WAIT_MS}; {g.DIMENSIONS} float32 per result); "
        f"the model's own limit: {limit:,.0f} items/s ==")
    res = {"msgpack": gpusim_run(cfg, "msgpack", g.MODEL_TASK, "msgpack"),
           "json": gpusim_run(cfg, "json", g.MODEL_TASK, "json"),
           "free": gpusim_run(cfg, "free", g.FREE_TASK, "msgpack"),
           "live": gpusim_live(cfg, "live", workers=1, shared_device=False),
           "shared": gpusim_live(cfg, "shared", workers=2, shared_device=True),
           "c2": gpusim_live(cfg, "c2", workers=1, shared_device=True, concurrency=2)}
    rep.data["gpusim"] = {"f_ms": f_ms, "p_ms": p_ms, "limit": limit, **res}
    model = f"F={f_ms:g} ms + P={p_ms:g} ms/item, batch {size}"
    for key in ("msgpack", "json"):
        d, target = res[key], GPUSIM_TARGETS[key]
        rep.add(f"GPU-sim {n:,} items ({model}), {key} results: items/s (worker-ready → last "
                f"result) vs the model's limit {size}/(F+P·{size}) = {limit:,.0f}/s "
                f"(mean batch {d['mean_batch'] or float('nan'):.1f})",
                fmt_rate(d["rate"]),
                ratio=f"{100 * d['rate'] / limit:.1f}% of limit (from first result: "
                      f"{100 * d['rate_from_first'] / limit:.1f}%)",
                target=f"≥ {100 * target:.0f}% of limit", met=met(d["rate"] >= target * limit))
    for key, what in (("live", "1 worker, items sent while it runs"),
                      ("shared", "2 workers sharing one simulated device"),
                      ("c2", "1 worker -c 2, its 2 pool processes sharing one simulated device")):
        d, target = res[key], GPUSIM_TARGETS[key]
        rep.add(f"GPU-sim live ({model}, msgpack), {what}: items/s (first send → last result; "
                f"sent at {LIVE_SEND_FACTOR:g}× the limit, {LIVE_CHUNK} per map_items, collected "
                f"as they finish; mean batch {d['mean_batch'] or float('nan'):.1f})",
                fmt_rate(d["rate"]), ratio=f"{100 * d['rate'] / limit:.1f}% of limit",
                target=f"≥ {100 * target:.0f}% of limit", met=met(d["rate"] >= target * limit))
    d = res["free"]
    rep.add(f"GPU-sim zero-cost function (no sleep), msgpack results: items/s "
            f"(mean batch {d['mean_batch'] or float('nan'):.1f})",
            fmt_rate(d["rate"]), ratio=f"{d['rate'] / limit:.1f}× the model's limit")
    for key, what in (("msgpack", "msgpack"), ("json", "json"), ("free", "zero-cost, msgpack"),
                      ("live", "live, 1 worker")):
        rep.add(f"GPU-sim ({what}): {CPU_LABEL}", fmt_cpu(res[key]["cpu_us"]))
    rep.add("GPU-sim: client reads every result back, ItemResults.get(), results/s — msgpack / "
            "json / zero-cost", " / ".join(fmt_rate(res[k]["get_rate"]) for k in ("msgpack", "json", "free")))


#: Items sent per ``map_items`` call in the live runs: about what a busy front end accumulates.
LIVE_CHUNK = 64
#: Live runs send at this multiple of the model's limit: the device never starves for lack of
#: items, and the queue holds a few batches, not the whole run, as in front of a service.
LIVE_SEND_FACTOR = 1.25
#: Seconds of the model's limit a live run lasts (enough batches that start-up doesn't count).
LIVE_SECONDS = 3.0


def gpusim_live(cfg: Config, label: str, workers: int, shared_device: bool,
                concurrency: int = 1) -> dict[str, Any]:
    """Start ``workers`` workers (``-c concurrency`` each), then send items in chunks
    (``map_items``) at 1.25× the model's limit while a second thread collects each chunk's
    values (``ItemResults.get``), as a service does. Rate = items / (first send → last stored
    result). With ``shared_device`` every pool process's model holds the same lock file (one
    simulated GPU); the limit is the device's."""
    import threading

    from benchmarks.apps import bench_gpusim as g

    r = redis_client(cfg.redis_url)
    r.flushdb()
    size = g.MAX_BATCH_SIZE
    limit = size / ((cfg.gpusim_f_ms + cfg.gpusim_p_ms * size) / 1000.0)
    n = max(cfg.gpusim_items, int(LIVE_SECONDS * limit) // LIVE_CHUNK * LIVE_CHUNK)
    queue = f"bench.gpusim.{label}"
    env = {"BENCH_RESULT_SERIALIZER": "msgpack", "BENCH_GPUSIM_F_MS": str(cfg.gpusim_f_ms),
           "BENCH_GPUSIM_P_MS": str(cfg.gpusim_p_ms)}
    if shared_device:
        env["BENCH_GPUSIM_DEVICE"] = str(Path(tempfile.mkdtemp()) / "gpu0.lock")
    client = g.make_app("msgpack")
    task = client.tasks[g.MODEL_TASK]
    started = [Worker("benchmarks.apps.bench_gpusim", queue, f"gpusim-{label}-{i}",
                      cfg.redis_url, env=env, concurrency=concurrency) for i in range(workers)]
    chunks: queue_mod.SimpleQueue[Any] = queue_mod.SimpleQueue()
    got: list[Any] = []
    errors: list[BaseException] = []

    def collect() -> None:
        try:
            while (job := chunks.get()) is not None:
                got.extend(job.get(timeout=cfg.drain_timeout))
        except BaseException as exc:  # noqa: BLE001 -- reported by the sending thread
            errors.append(exc)

    try:
        for w in started:
            w.start()
        collector = threading.Thread(target=collect, name="gpusim-collector")
        collector.start()
        cpu = ProcessCpu(started[0]) if workers == 1 and concurrency == 1 else None
        xs = list(range(n))
        ids: list[str] = []
        t0 = time.time()
        pace = LIVE_CHUNK / (LIVE_SEND_FACTOR * limit)
        for k, i in enumerate(range(0, n, LIVE_CHUNK)):
            results = task.map_items(xs[i:i + LIVE_CHUNK], queue=queue)
            ids.extend(res.id for res in results)
            chunks.put(results)
            delay = t0 + (k + 1) * pace - time.time()
            if delay > 0:
                time.sleep(delay)
        chunks.put(None)
        collector.join(cfg.drain_timeout)
        cpu_us = cpu.per_item(n) if cpu is not None else None
        stats = [batching_stats(client, w.hostname, g.MODEL_TASK) for w in started]
    finally:
        for w in started:
            w.stop()
    if errors:
        raise errors[0]
    if got != [g.expected_row(x) for x in xs]:
        raise CorrectnessError(f"gpusim-{label}: the collected values are not the items' rows")
    metas = fetch_results(r, ids, decode=decoder("msgpack"))
    last = max(date_done_ts(m) for m in metas if m)
    batches = sum(s["batches"] for s in stats if s)
    out = {"n": n, "workers": workers, "concurrency": concurrency,
           "shared_device": shared_device, "limit": limit,
           "rate": n / (last - t0), "cpu_us": cpu_us,
           "mean_batch": (sum(s["items"] for s in stats if s) / batches) if batches else None}
    log(f"  gpusim-{label}: {n:,} items sent at {LIVE_SEND_FACTOR:g}× the limit to {workers} "
        f"worker(s) -c {concurrency}{' sharing one device' if shared_device else ''}: "
        f"{out['rate']:,.0f} items/s "
        f"= {100 * out['rate'] / limit:.1f}% of the limit (mean batch "
        f"{out['mean_batch'] or float('nan'):.1f})"
        + (f"; {CPU_LABEL}: {fmt_cpu(cpu_us)}" if cpu_us else ""))
    client.close()
    r.flushdb()
    r.close()
    return out
