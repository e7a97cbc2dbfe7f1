#!/usr/bin/env python
"""celery_batched benchmarks: one command, every number side by side.

    python benchmarks/run.py                 # full run (a few minutes)
    python benchmarks/run.py --quick         # smoke run (about a minute)
    python benchmarks/run.py --only drain,latency --out results.md

Sections (see benchmarks/README.md): drain, gpusim, latency, bulk, embed, rss.
Every worker is a real ``celery worker -P prefork -c 1`` subprocess on Redis (db 13 by default,
flushed at the start of every section). Exit status is non-zero when a correctness check fails
(a wrong or missing result); missed performance targets are only marked in the table.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import signal
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.bench.bulk import section_bulk  # noqa: E402
from benchmarks.bench.common import DEFAULT_REDIS_URL, LOG_DIR, T0, CorrectnessError, log  # noqa: E402
from benchmarks.bench.config import Config  # noqa: E402
from benchmarks.bench.cpu import CpuMeter  # noqa: E402
from benchmarks.bench.drain import section_drain  # noqa: E402
from benchmarks.bench.embed import section_embed  # noqa: E402
from benchmarks.bench.gpusim import section_gpusim  # noqa: E402
from benchmarks.bench.latency import section_latency  # noqa: E402
from benchmarks.bench.report import Report, environment, render  # noqa: E402
from benchmarks.bench.results import redis_client  # noqa: E402
from benchmarks.bench.rss import section_rss  # noqa: E402
from benchmarks.bench.workers import _kill_all_workers, _on_signal  # noqa: E402

# Each section is benchmarks/bench/<name>.py; the helpers they share are there too (see its
# __init__.py). The order here is the order they run in.
SECTIONS = ("drain", "gpusim", "latency", "bulk", "embed", "rss")


def parse_args(argv: Sequence[str] | None = None) -> tuple[Config, list[str], argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short smoke run (small sizes)")
    p.add_argument("--only", default="", help=f"comma-separated sections: {', '.join(SECTIONS)}")
    p.add_argument("--out", type=Path, help="also write the final table (markdown) to this file")
    p.add_argument("--json", type=Path, help="also write every measured number (JSON) to this file")
    p.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL", DEFAULT_REDIS_URL),
                   help="broker and result backend (FLUSHDB'd!); default redis://127.0.0.1:6379/13")
    p.add_argument("--drain-items", type=int, help="items per drain run (default 20000; quick 2000)")
    p.add_argument("--repeat", type=int, default=1, help="drain runs per library; the median is reported")
    p.add_argument("--load-fraction", type=float, default=0.5,
                   help="loaded latency: arrival rate as a fraction of the drain throughput (default 0.5)")
    p.add_argument("--rss-items", type=int, help="items for the RSS drain (default 200000; quick 20000)")
    p.add_argument("--rss-cap", type=float, help="stop sampling the RSS drain after this many seconds (default 90)")
    p.add_argument("--embed-items", type=int, help="sentences through the worker in the embed section "
                   "(default 1024 on the CPU, 5120 on CUDA; quick 64 / 1024); embed_one uses the "
                   "first 128 (quick 32)")
    p.add_argument("--embed-rounds", type=int,
                   help="embed: alternating rounds of the model called directly and through the "
                        "worker (default 3; quick 1); the median round is reported")
    p.add_argument("--embed-batch", type=int,
                   help="the embed worker's max_batch_size (EXAMPLE_EMBED_BATCH_SIZE; default 128 "
                        "when CUDA is available, else 32)")
    p.add_argument("--embed-threads", type=int, default=0,
                   help="torch CPU threads for the embed section, in this process and in the worker "
                        "(default: torch's own choice, all cores)")
    p.add_argument("--gpusim-f-ms", type=float, default=40.0,
                   help="gpusim: fixed milliseconds per call of the simulated model (default 40)")
    p.add_argument("--gpusim-p-ms", type=float, default=0.25,
                   help="gpusim: milliseconds per item of the simulated model (default 0.25)")
    p.add_argument("--gpusim-items", type=int,
                   help="gpusim: items per run (default 5120 = 40 full batches; quick 1536)")
    p.add_argument("--no-install", action="store_true",
                   help="don't create benchmarks/.venvs/celery-batches when it is missing")
    a = p.parse_args(argv)
    sections = [s.strip() for s in a.only.split(",") if s.strip()] or list(SECTIONS)
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        p.error(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    q = a.quick
    cfg = Config(
        redis_url=a.redis_url, quick=q, repeat=max(1, a.repeat),
        drain_items=a.drain_items or (2_000 if q else 20_000),
        drain_timeout=120.0 if q else 300.0,
        latency_idle_items=40 if q else 200,
        latency_load_s=1.5 if q else 4.0,
        load_fraction=a.load_fraction,
        bulk_items=5_000 if q else 20_000,
        bulk_loop_items=1_000 if q else 5_000,
        embed_items=a.embed_items,
        cpu_embed_items=64 if q else 1_024,
        gpu_embed_items=1_024 if q else 5_120,
        embed_one_items=32 if q else 128,
        embed_rounds=a.embed_rounds or (1 if q else 3),
        embed_threads=a.embed_threads,
        embed_timeout=300.0,
        embed_batch=a.embed_batch,
        embed_sweep_s=0.3 if q else 1.0,
        gpusim_items=a.gpusim_items or (1_536 if q else 5_120),
        gpusim_f_ms=a.gpusim_f_ms,
        gpusim_p_ms=a.gpusim_p_ms,
        rss_items=a.rss_items or (20_000 if q else 200_000),
        rss_cap_s=a.rss_cap or (20.0 if q else 90.0),
        install_cbatches=not a.no_install,
    )
    return cfg, sections, a


def main(argv: Sequence[str] | None = None) -> int:
    cfg, sections, a = parse_args(argv)
    os.environ["BENCH_BROKER_URL"] = cfg.redis_url
    os.environ["BENCH_BACKEND_URL"] = cfg.redis_url
    atexit.register(_kill_all_workers)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    lock = open(LOG_DIR / "run.lock", "w")
    try:  # two runs would FLUSHDB each other's queues and results
        import fcntl

        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"another benchmarks/run.py is running in this checkout ({LOG_DIR / 'run.lock'}); "
              f"wait for it to finish", file=sys.stderr)
        return 2
    except ImportError:  # pragma: no cover  (not POSIX)
        pass
    r = redis_client(cfg.redis_url)
    try:
        r.ping()
    except Exception as exc:  # noqa: BLE001
        print(f"Redis not reachable at {cfg.redis_url}: {exc!r}", file=sys.stderr)
        return 2
    r.flushdb()
    r.close()
    if LOG_DIR.is_dir():  # worker logs of the previous run
        for old in LOG_DIR.glob("*.log"):
            old.unlink()
    env = environment()
    log(f"celery_batched benchmarks ({'quick' if cfg.quick else 'full'}): {', '.join(sections)}; "
        f"Redis {cfg.redis_url}; {env['CPU']}; GPU {env['GPU']}")
    rep = Report()
    runners = {"drain": section_drain, "gpusim": section_gpusim, "latency": section_latency,
               "bulk": section_bulk,
               "embed": section_embed, "rss": section_rss}
    interrupted = False
    meter = CpuMeter()
    for name in sections:
        t = time.monotonic()
        cpu0 = meter.snapshot()
        try:
            runners[name](cfg, rep)
        except CorrectnessError as exc:
            rep.fail(str(exc))
            rep.add(f"{name}: correctness check", "FAILED", target="all results correct", met="**NO**")
        except KeyboardInterrupt:
            interrupted = True
            log("interrupted")
            break
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            rep.fail(f"section {name} crashed: {exc!r}")
            rep.add(f"{name}: section crashed", "ERROR", target="runs", met="**NO**")
        finally:
            _kill_all_workers()
        other, steal = CpuMeter.other_cpus(cpu0, meter.snapshot())
        rep.load[name] = (other, steal)
        log(f"   ({name} took {time.monotonic() - t:.0f}s; other programs on this machine used "
            f"{other:.2f} of {os.cpu_count()} CPUs meanwhile, steal {steal:.2f})")
    try:
        redis_client(cfg.redis_url).flushdb()
    except Exception:  # noqa: BLE001
        pass
    text = render(rep, env, cfg, sections)
    print("\n" + text, flush=True)
    if a.out:
        a.out.write_text(text)
        log(f"table written to {a.out}")
    if a.json:
        a.json.write_text(json.dumps({"env": env, "config": cfg.__dict__, "results": rep.data,
                                      "other_cpu_load": rep.load, "failures": rep.failures}, indent=1, default=str))
        log(f"numbers written to {a.json}")
    log(f"total {time.monotonic() - T0:.0f}s")
    if rep.failures:
        print(f"\nFAILED: {len(rep.failures)} correctness check(s) failed:", file=sys.stderr)
        for f in rep.failures:
            print(f"  - {f}", file=sys.stderr)
        return 1
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
