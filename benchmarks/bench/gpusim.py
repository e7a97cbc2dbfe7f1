"""Section 2, ``gpusim``: a simulated GPU model (a batched call that sleeps) with vector results,
msgpack vs json, against the model's own limit."""

from __future__ import annotations

import gc
import time
from typing import Any

from .common import CorrectnessError, log
from .config import Config
from .cpu import CPU_LABEL, ProcessCpu, fmt_cpu
from .report import Report, fmt_rate, met
from .results import decoder, redis_client
from .timed_drain import drain_with_worker

GPUSIM_TARGETS = {"msgpack": 0.90, "json": 0.70}


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
           "free": gpusim_run(cfg, "free", g.FREE_TASK, "msgpack")}
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
    d = res["free"]
    rep.add(f"GPU-sim zero-cost function (no sleep), msgpack results: items/s "
            f"(mean batch {d['mean_batch'] or float('nan'):.1f})",
            fmt_rate(d["rate"]), ratio=f"{d['rate'] / limit:.1f}× the model's limit")
    for key, what in (("msgpack", "msgpack"), ("json", "json"), ("free", "zero-cost, msgpack")):
        rep.add(f"GPU-sim ({what}): {CPU_LABEL}", fmt_cpu(res[key]["cpu_us"]))
    rep.add("GPU-sim: client reads every result back, ItemResults.get(), results/s — msgpack / "
            "json / zero-cost", " / ".join(fmt_rate(res[k]["get_rate"]) for k in ("msgpack", "json", "free")))
