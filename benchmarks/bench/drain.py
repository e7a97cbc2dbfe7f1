"""Section 1, ``drain``: throughput of pre-enqueued add(x, y) drained by one worker: celery_batched
vs plain Celery vs celery-batches."""

from __future__ import annotations

from typing import Any

from .cbatches import CB_PYTHON, CB_VENV, ensure_cbatches
from .common import ROOT, log
from .config import Config
from .cpu import CPU_LABEL, fmt_cpu
from .report import Report, fmt_rate, fmt_ratio, met
from .timed_drain import drain_once


def drain_repeated(cfg: Config, *args: Any, **kwargs: Any) -> dict[str, Any]:
    runs = [drain_once(cfg, *args, **kwargs) for _ in range(cfg.repeat)]
    runs.sort(key=lambda d: d["rate"])
    best = runs[len(runs) // 2]  # the median run
    if len(runs) > 1:
        best = {**best, "all_rates": [round(d["rate"]) for d in runs]}
    return best


DRAIN_TARGET_VS_PLAIN = 15.0
DRAIN_TARGET_VS_CBATCHES = 10.0


def section_drain(cfg: Config, rep: Report) -> None:
    n = cfg.drain_items
    log(f"== drain: {n:,} pre-enqueued add(x, y) drained by one prefork -c 1 worker ==")
    from benchmarks.apps import bench_batched

    res: dict[str, dict[str, Any] | None] = {}
    res["batched"] = drain_repeated(cfg, "batched", "benchmarks.apps.bench_batched",
                                    bench_batched.add.name, n, stats_app=bench_batched.app)
    res["plain"] = drain_repeated(cfg, "plain", "benchmarks.apps.bench_plain", "bench.plain.add", n)
    ok, info = ensure_cbatches(cfg.install_cbatches)
    if ok:
        log(f"  celery-batches: {info} ({CB_VENV.relative_to(ROOT)})")
        res["cbatches"] = drain_repeated(cfg, "cbatches", "benchmarks.apps.bench_cbatches",
                                         "bench.cbatches.add", n, python=CB_PYTHON)
    else:
        res["cbatches"] = None
        rep.note(f"celery-batches not available: {info}")
    rep.data["drain"] = res

    def rates(key: str) -> tuple[Any, ...]:
        return tuple((res[k] or {}).get(key) for k in ("batched", "plain", "cbatches"))

    def vs(a: float | None, b: float | None, target: float) -> tuple[str, str]:
        if a is None or b is None:
            return "n/a", "—"
        return f"{a / b:.2f}×", met(a >= target * b)

    b, p, c = rates("rate")
    (rp, mp), (rc, mc) = vs(b, p, DRAIN_TARGET_VS_PLAIN), vs(b, c, DRAIN_TARGET_VS_CBATCHES)
    rep.add(f"Drain {n:,} add(x,y), items/s (worker-ready → last result stored)",
            fmt_rate(b), fmt_rate(p), fmt_rate(c) if c else "not available",
            f"{rp} vs plain; {rc} vs celery-batches",
            target=f"≥ {DRAIN_TARGET_VS_PLAIN:.0f}× plain; ≥ {DRAIN_TARGET_VS_CBATCHES:.0f}× celery-batches",
            met=f"{mp}; {mc}")
    bf, pf, cf = rates("rate_from_first")
    rep.add("Drain, items/s (first → last result stored)", fmt_rate(bf), fmt_rate(pf),
            fmt_rate(cf) if cf else "not available",
            f"{fmt_ratio(bf, pf)} vs plain; {fmt_ratio(bf, cf)} vs celery-batches")
    rep.add(f"Drain: {CPU_LABEL}",
            *(fmt_cpu(d["cpu_us"]) if d else "not available" for d in res.values()))
    if res["batched"] and res["batched"].get("mean_batch"):
        rep.add("Drain: mean batch size (batching_stats)", f"{res['batched']['mean_batch']:.1f}")
