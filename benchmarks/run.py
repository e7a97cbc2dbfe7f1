#!/usr/bin/env python
"""celery_batched benchmarks: one command, every number side by side.

    python benchmarks/run.py                 # full run (a few minutes)
    python benchmarks/run.py --quick         # smoke run (about a minute)
    python benchmarks/run.py --only drain,latency --out results.md

Sections (see benchmarks/README.md): drain, latency, bulk, embed, rss.
Every worker is a real ``celery worker -P prefork -c 1`` subprocess on Redis (db 13 by default,
flushed at the start of every section). Exit status is non-zero when a correctness check fails
(a wrong or missing result); missed performance targets are only marked in the table.
"""

from __future__ import annotations

import argparse
import atexit
import base64
import datetime as dt
import json
import math
import multiprocessing as mp
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import time
import traceback
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
LOG_DIR = BENCH / ".logs"
CB_VENV = BENCH / ".venvs" / "celery-batches"
CB_PYTHON = CB_VENV / "bin" / "python"
CB_REQUIREMENTS = ["celery-batches==0.11", "celery[redis]<5.7"]
RESULT_PREFIX = "celery-task-meta-"
SECTIONS = ("drain", "latency", "bulk", "embed", "rss")

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


# ----------------------------------------------------------------------------------------------
# Output helpers
# ----------------------------------------------------------------------------------------------

T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[{time.monotonic() - T0:7.1f}s] {msg}", flush=True)


class CorrectnessError(Exception):
    """A wrong or missing result: the run fails (exit status 1)."""


@dataclass
class Row:
    metric: str
    batched: str = "—"
    plain: str = "—"
    cbatches: str = "—"
    ratio: str = "—"
    target: str = "—"
    met: str = "—"


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    load: dict[str, tuple[float, float]] = field(default_factory=dict)

    def add(self, *args: Any, **kwargs: Any) -> None:
        self.rows.append(Row(*args, **kwargs))

    def note(self, text: str) -> None:
        self.notes.append(text)
        log(f"note: {text}")

    def fail(self, text: str) -> None:
        self.failures.append(text)
        print(f"\n!!! CORRECTNESS FAILURE: {text}\n", file=sys.stderr, flush=True)


def fmt_rate(x: float | None) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:,.0f}"


def fmt_ms(x: float | None) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:.1f}"


def fmt_ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
        return "n/a"
    return f"{a / b:.2f}×"


def met(ok: bool | None) -> str:
    return "—" if ok is None else ("yes" if ok else "**NO**")


def percentile(values: Sequence[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return float("nan")
    xs = sorted(values)
    k = (len(xs) - 1) * p / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


class CpuMeter:
    """How much CPU *other* programs used during a section (this machine is shared).

    System-wide busy CPU minus this process tree (live and reaped children) minus
    redis-server, averaged over the wall time, in CPUs. Steal time (hypervisor) separately.
    """

    def __init__(self) -> None:
        import psutil

        self._psutil = psutil
        self.redis = next((p for p in psutil.process_iter(["name"])
                           if (p.info["name"] or "").startswith("redis-server")), None)

    def snapshot(self) -> tuple[float, float, float, float]:
        psutil = self._psutil
        ct = psutil.cpu_times()
        busy = ct.user + ct.nice + ct.system + getattr(ct, "irq", 0) + getattr(ct, "softirq", 0)
        steal = getattr(ct, "steal", 0.0)
        t = os.times()
        ours = t.user + t.system + t.children_user + t.children_system
        for child in psutil.Process().children(recursive=True):
            try:
                c = child.cpu_times()
                ours += c.user + c.system + c.children_user + c.children_system
            except psutil.Error:
                pass
        if self.redis is not None:
            try:
                c = self.redis.cpu_times()
                ours += c.user + c.system
            except psutil.Error:
                pass
        return time.monotonic(), busy, steal, ours

    @staticmethod
    def other_cpus(a: tuple[float, float, float, float], b: tuple[float, float, float, float]
                   ) -> tuple[float, float]:
        wall = max(1e-9, b[0] - a[0])
        return max(0.0, (b[1] - a[1]) - (b[3] - a[3])) / wall, (b[2] - a[2]) / wall


# ----------------------------------------------------------------------------------------------
# Redis and results
# ----------------------------------------------------------------------------------------------

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


def fetch_results(r: Any, ids: Sequence[str], chunk: int = 5_000) -> list[dict[str, Any] | None]:
    keys = result_keys(ids)
    out: list[dict[str, Any] | None] = []
    for i in range(0, len(keys), chunk):
        for raw in r.mget(keys[i:i + chunk]):
            out.append(json.loads(raw) if raw is not None else None)
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
                     interval: float = 0.05) -> int:
    """Poll until every result is stored; return how many are.

    Results arrive roughly in queue order, so each poll checks a window of 1,000 keys from the
    first missing one (one EXISTS) instead of all of them: the harness's own Redis load stays
    constant, whatever the number of items, rather than competing with the worker under test.
    Timings come from the results' own ``date_done``, not from this loop.
    """
    deadline = time.monotonic() + timeout
    keys = result_keys(ids)
    start, window = 0, 1000
    while time.monotonic() < deadline:
        while start < len(keys):
            chunk = keys[start:start + window]
            if r.exists(*chunk) < len(chunk):
                break
            start += len(chunk)
        if start >= len(keys):
            n = count_results(r, ids)  # every key, once, before declaring the drain done
            if n >= len(ids):
                return n
            start = 0
        if worker is not None:
            worker.check_alive()
        time.sleep(interval)
    return count_results(r, ids)


# ----------------------------------------------------------------------------------------------
# Workers
# ----------------------------------------------------------------------------------------------

_WORKERS: list[Worker] = []


class Worker:
    """One ``celery worker -P prefork -c 1`` subprocess, in its own process group."""

    def __init__(self, app_module: str, queue: str, label: str, redis_url: str,
                 python: Path | str = sys.executable, env: dict[str, str] | None = None,
                 concurrency: int = 1, pool: str = "prefork") -> None:
        tag = uuid.uuid4().hex[:6]
        self.label = label
        self.hostname = f"bench-{label}-{tag}@bench"
        self.ready_key = f"bench:ready:{self.hostname}"
        self.redis_url = redis_url
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        self.log_path = LOG_DIR / f"{label}-{tag}.log"
        self.cmd = [str(python), "-m", "celery", "-A", app_module, "worker", "-Q", queue,
                    "-P", pool, "-c", str(concurrency), "-n", self.hostname,
                    "--without-mingle", "--without-gossip", "--loglevel=WARNING"]
        self.env = {**os.environ,
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                    "PYTHONUNBUFFERED": "1",
                    "BENCH_READY_KEY": self.ready_key,
                    **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready_at: float | None = None

    def start(self, timeout: float = 120.0) -> Worker:
        self._logf = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=self.env, stdout=self._logf,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        _WORKERS.append(self)
        r = redis_client(self.redis_url)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                raw = r.get(self.ready_key)
                if raw is not None:
                    self.ready_at = float(raw)
                    return self
                self.check_alive()
                time.sleep(0.01)
        finally:
            r.close()
        self.stop()
        raise RuntimeError(f"worker {self.label} not ready after {timeout}s:\n{self.log_tail()}")

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"worker {self.label} exited with {self.proc.returncode}:\n"
                               f"{self.log_tail()}")

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return "(no log)"

    def processes(self) -> list[Any]:
        import psutil

        if self.proc is None:
            return []
        try:
            main = psutil.Process(self.proc.pid)
            return [main, *main.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def rss(self) -> int:
        import psutil

        total = 0
        for p in self.processes():
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total

    def cpu_split(self) -> tuple[float, float]:
        """CPU seconds (user + system) so far: (main process, pool processes)."""
        import psutil

        procs = self.processes()
        main, pool = 0.0, 0.0
        for k, p in enumerate(procs):
            try:
                t = p.cpu_times()
            except psutil.NoSuchProcess:
                continue
            if k == 0:
                main += t.user + t.system
            else:
                pool += t.user + t.system
        return main, pool

    def stop(self, timeout: float = 15.0) -> None:
        """Warm shutdown, then SIGKILL whatever is left of the process group.

        SIGTERM goes to the main process only: Celery's warm shutdown lets the running batch
        finish. (SIGTERM to the whole group would kill the pool process mid-batch, and its items
        would be marked failed with WorkerLostError.)
        """
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:  # pool children that outlived their parent, too
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        if self in _WORKERS:
            _WORKERS.remove(self)
        self._logf.close()

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _kill_all_workers() -> None:
    for w in list(_WORKERS):
        try:
            w.stop(timeout=5)
        except Exception:  # noqa: BLE001
            pass


def _on_signal(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def batching_stats(app: Any, hostname: str, task_name: str) -> dict[str, Any] | None:
    """``inspect().batching_stats()`` for one worker and task, or None when unavailable."""
    for attempt in range(3):
        try:
            inspect = app.control.inspect(destination=[hostname], timeout=2.0)
            call = getattr(inspect, "batching_stats", None)
            # Older checkouts have the worker-side command only: call it by name.
            replies = (call() if call else inspect._request("batching_stats")) or {}
            if hostname in replies:
                return replies[hostname].get(task_name)
        except Exception as exc:  # noqa: BLE001
            if attempt == 2:
                log(f"batching_stats unavailable: {exc!r}")
    return None


def mean_batch(stats: dict[str, Any] | None, before: dict[str, Any] | None = None) -> float | None:
    if not stats:
        return None
    items = stats["items"] - (before or {}).get("items", 0)
    batches = stats["batches"] - (before or {}).get("batches", 0)
    return items / batches if batches else None


def size_histogram(stats: dict[str, Any] | None, top: int = 4) -> str:
    if not stats:
        return "n/a"
    sizes = sorted(((int(k), v) for k, v in stats["batch_sizes"].items()), key=lambda kv: -kv[1])
    return ", ".join(f"{k}×{v}" for k, v in sizes[:top]) + (" …" if len(sizes) > top else "")


# ----------------------------------------------------------------------------------------------
# Enqueueing without a worker
# ----------------------------------------------------------------------------------------------

class RawEnqueuer:
    """Puts Celery task messages straight on a Redis queue list, many per round trip.

    The message is a template copied from a real ``send_task`` publish (so its format is
    exactly what this kombu/Celery produce); per item only the task id, arguments, argsrepr and
    delivery tag change. Used to pre-load queues fast (not a measured path).
    """

    def __init__(self, app: Any, task_name: str, r: Any) -> None:
        scratch = f"bench.template.{uuid.uuid4().hex[:8]}"
        app.send_task(task_name, args=(0, 0), queue=scratch)
        raw = r.lrange(scratch, 0, -1)
        r.delete(scratch)
        if len(raw) != 1:
            raise RuntimeError(f"template publish left {len(raw)} messages on {scratch}")
        env = json.loads(raw[0])
        if env["properties"].get("body_encoding") != "base64":
            raise RuntimeError(f"unexpected body encoding {env['properties'].get('body_encoding')}")
        body = json.loads(base64.b64decode(env["body"]))
        self.envelope = env
        self.embed = body[2]
        self.task_name = task_name

    def messages(self, ids: Sequence[str], arg_tuples: Sequence[Sequence[Any]],
                 queue: str) -> Iterable[str]:
        env, embed = self.envelope, self.embed
        headers0, props0 = env["headers"], env["properties"]
        delivery_info = {**props0.get("delivery_info", {}), "routing_key": queue}
        for tid, args in zip(ids, arg_tuples):
            body = base64.b64encode(json.dumps([list(args), {}, embed]).encode()).decode()
            headers = {**headers0, "id": tid, "root_id": tid, "argsrepr": repr(tuple(args))}
            props = {**props0, "correlation_id": tid, "delivery_tag": str(uuid.uuid4()),
                     "delivery_info": delivery_info}
            yield json.dumps({**env, "body": body, "headers": headers, "properties": props})

    def push(self, r: Any, queue: str, ids: Sequence[str], arg_tuples: Sequence[Sequence[Any]],
             chunk: int = 5_000) -> None:
        """LPUSH in order: the first item is consumed first (kombu BRPOPs the list's tail)."""
        batch: list[str] = []
        for msg in self.messages(ids, arg_tuples, queue):
            batch.append(msg)
            if len(batch) >= chunk:
                r.lpush(queue, *batch)
                batch = []
        if batch:
            r.lpush(queue, *batch)


def sender_app(redis_url: str) -> Any:
    from celery import Celery

    app = Celery("bench_sender", broker=redis_url, backend=redis_url)
    app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"],
                    broker_connection_retry_on_startup=True)
    return app


# ----------------------------------------------------------------------------------------------
# celery-batches in its own virtualenv
# ----------------------------------------------------------------------------------------------

def ensure_cbatches(install: bool) -> tuple[bool, str]:
    def probe() -> tuple[bool, str]:
        if not CB_PYTHON.exists():
            return False, "no virtualenv"
        out = subprocess.run(
            [str(CB_PYTHON), "-c", "import celery, celery_batches, redis; "
             "from importlib.metadata import version as v; "
             "print(v('celery-batches'), celery.__version__)"],
            capture_output=True, text=True, timeout=60)
        if out.returncode:
            return False, out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "import failed"
        cb, cel = out.stdout.split()
        return True, f"celery-batches {cb} on celery {cel}"

    ok, info = probe()
    if ok or not install:
        return ok, info
    log(f"installing {' '.join(CB_REQUIREMENTS)} into {CB_VENV.relative_to(ROOT)} ...")
    try:
        CB_VENV.parent.mkdir(parents=True, exist_ok=True)
        if not CB_PYTHON.exists():
            subprocess.run([sys.executable, "-m", "venv", str(CB_VENV)], check=True,
                           capture_output=True, text=True, timeout=120)
        out = subprocess.run([str(CB_PYTHON), "-m", "pip", "install", "-q", *CB_REQUIREMENTS],
                             capture_output=True, text=True, timeout=600)
        if out.returncode:
            tail = (out.stderr or out.stdout).strip().splitlines()[-3:]
            return False, "pip install failed: " + " | ".join(tail)
    except Exception as exc:  # noqa: BLE001
        return False, f"install failed: {exc!r}"
    return probe()


# ----------------------------------------------------------------------------------------------
# Section 1: drain throughput
# ----------------------------------------------------------------------------------------------

def drain_once(cfg: Config, label: str, app_module: str, task_name: str, n: int,
               python: Path | str = sys.executable, stats_app: Any = None) -> dict[str, Any]:
    r = redis_client(cfg.redis_url)
    r.flushdb()
    queue = f"bench.drain.{label}"
    ids = [str(uuid.uuid4()) for _ in range(n)]
    args = [(i, 2 * i + 1) for i in range(n)]
    t = time.perf_counter()
    RawEnqueuer(sender_app(cfg.redis_url), task_name, r).push(r, queue, ids, args)
    assert r.llen(queue) == n, f"enqueued {r.llen(queue)} of {n}"
    log(f"  {label}: {n:,} messages enqueued ({time.perf_counter() - t:.1f}s, not timed); starting worker")
    redis_proc = CpuMeter().redis
    worker = Worker(app_module, queue, f"drain-{label}", cfg.redis_url, python=python).start()
    try:
        cpu0, redis0 = worker.cpu_split(), _cpu(redis_proc)
        done = wait_for_results(r, ids, timeout=cfg.drain_timeout, worker=worker)
        cpu1, redis1 = worker.cpu_split(), _cpu(redis_proc)
        stats = batching_stats(stats_app, worker.hostname, task_name) if stats_app else None
        unacked = r.hlen("unacked")
    finally:
        worker.stop()
    metas = fetch_results(r, ids)
    verify_results(f"drain[{label}]", metas, ids, [x + y for x, y in args])
    stamps = [date_done_ts(m) for m in metas if m]
    assert worker.ready_at is not None
    first, last = min(stamps), max(stamps)
    out = {
        "n": n, "done": done,
        "seconds": last - worker.ready_at,
        "rate": n / (last - worker.ready_at),
        "rate_from_first": (n - 1) / (last - first) if last > first else float("nan"),
        "first_result_ms": (first - worker.ready_at) * 1000,
        "mean_batch": mean_batch(stats),
        "histogram": size_histogram(stats),
        "unacked_after": unacked,
        # CPU milliseconds per 1,000 items (drain only; Redis also answers our polling).
        "cpu_main": (cpu1[0] - cpu0[0]) * 1e6 / n, "cpu_pool": (cpu1[1] - cpu0[1]) * 1e6 / n,
        "cpu_redis": (redis1 - redis0) * 1e6 / n if redis_proc is not None else float("nan"),
    }
    extra = (f", mean batch {out['mean_batch']:.1f} ({out['histogram']})"
             if out["mean_batch"] else "")
    extra += (f"; CPU per 1,000 items: worker main {out['cpu_main']:.0f} ms, pool "
              f"{out['cpu_pool']:.0f} ms, redis-server {out['cpu_redis']:.0f} ms")
    log(f"  {label}: {n:,} results in {out['seconds']:.2f}s from worker-ready -> "
        f"{out['rate']:,.0f} items/s (from first result: {out['rate_from_first']:,.0f}/s; "
        f"first result after {out['first_result_ms']:.0f} ms){extra}")
    r.flushdb()
    r.close()
    return out


def _cpu(proc: Any) -> float:
    if proc is None:
        return 0.0
    try:
        t = proc.cpu_times()
        return float(t.user + t.system)
    except Exception:  # noqa: BLE001
        return 0.0


def drain_repeated(cfg: Config, *args: Any, **kwargs: Any) -> dict[str, Any]:
    runs = [drain_once(cfg, *args, **kwargs) for _ in range(cfg.repeat)]
    runs.sort(key=lambda d: d["rate"])
    best = runs[len(runs) // 2]  # the median run
    if len(runs) > 1:
        best = {**best, "all_rates": [round(d["rate"]) for d in runs]}
    return best


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
    b, p, c = (res[k]["rate"] if res[k] else None for k in ("batched", "plain", "cbatches"))
    rep.add(f"Drain {n:,} add(x,y), items/s (worker-ready → last result stored)",
            fmt_rate(b), fmt_rate(p), fmt_rate(c) if c else "not available",
            f"{fmt_ratio(b, p)} vs plain; {fmt_ratio(b, c)} vs celery-batches")
    bf, pf, cf = (res[k]["rate_from_first"] if res[k] else None for k in ("batched", "plain", "cbatches"))
    rep.add("Drain, items/s (first → last result stored)", fmt_rate(bf), fmt_rate(pf),
            fmt_rate(cf) if cf else "not available",
            f"{fmt_ratio(bf, pf)} vs plain; {fmt_ratio(bf, cf)} vs celery-batches")
    def cpu(k: str) -> str:
        d = res[k]
        return (f"{d['cpu_main']:.0f} / {d['cpu_pool']:.0f} / {d['cpu_redis']:.0f}" if d
                else "not available")

    rep.add("Drain: CPU ms per 1,000 items — worker main (consumer) / pool process / redis-server",
            cpu("batched"), cpu("plain"), cpu("cbatches"))
    if res["batched"] and res["batched"].get("mean_batch"):
        rep.add("Drain: mean batch size (batching_stats)", f"{res['batched']['mean_batch']:.1f}")


# ----------------------------------------------------------------------------------------------
# Section 2: latency
# ----------------------------------------------------------------------------------------------

def _listener(url: str, conn: Any, ready: Any, stop: Any) -> None:
    """Subprocess: time.time() at which each result's PUBLISH arrives (Redis backend pub/sub)."""
    import redis

    client = redis.Redis.from_url(url)
    pubsub = client.pubsub()
    pubsub.psubscribe(RESULT_PREFIX + "*")
    while True:  # the subscription is confirmed before we report ready
        msg = pubsub.get_message(timeout=5)
        if msg and msg["type"] == "psubscribe":
            break
    ready.set()
    seen: dict[str, float] = {}
    cut = len(RESULT_PREFIX)
    while not stop.is_set():
        msg = pubsub.get_message(timeout=0.05)
        if msg is not None and msg["type"] == "pmessage":
            seen[msg["channel"][cut:].decode()] = time.time()
    conn.send(seen)
    conn.close()


class ResultListener:
    def __init__(self, url: str) -> None:
        ctx = mp.get_context("spawn")
        self._recv, send = ctx.Pipe(duplex=False)
        self._ready, self._stop = ctx.Event(), ctx.Event()
        self.proc = ctx.Process(target=_listener, args=(url, send, self._ready, self._stop),
                                daemon=True)

    def __enter__(self) -> ResultListener:
        self.proc.start()
        if not self._ready.wait(30):
            raise RuntimeError("result listener did not subscribe")
        return self

    def collect(self) -> dict[str, float]:
        self._stop.set()
        seen = self._recv.recv() if self._recv.poll(30) else {}
        self.proc.join(5)
        return seen

    def __exit__(self, *exc: Any) -> None:
        if self.proc.is_alive():
            self._stop.set()
            self.proc.join(5)
            if self.proc.is_alive():
                self.proc.kill()


def paced_send(task: Any, queue: str, n: int | None, interval: float, duration: float | None = None,
               burst_tick: float | None = None) -> tuple[dict[str, float], dict[str, tuple[int, int]]]:
    """Send items at one per ``interval`` seconds (n items, or for ``duration`` seconds).

    One ``apply_async`` per item; or, with ``burst_tick``, every ``burst_tick`` seconds one
    ``starmap_items`` call with the items due by then (cheaper per item: one Python sender can
    then reach rates an ``apply_async`` loop can't). Each item's submit time is taken just
    before the call that sends it.
    """
    submits: dict[str, float] = {}
    argmap: dict[str, tuple[int, int]] = {}
    start = time.perf_counter()
    i = 0
    last_send = -math.inf
    while True:
        now = time.perf_counter()
        if duration is not None and now - start >= duration:
            break
        if n is not None and i >= n:
            break
        if burst_tick is None:
            target = start + i * interval
            if target > now:
                time.sleep(target - now)
            tid = str(uuid.uuid4())
            args = (i, 3 * i)
            submits[tid] = time.time()
            task.apply_async(args, task_id=tid, queue=queue)
            argmap[tid] = args
            i += 1
            continue
        due = int((now - start) / interval) + 1
        if n is not None:
            due = min(due, n)
        if due > i:
            batch = [(j, 3 * j) for j in range(i, due)]
            t_submit = time.time()
            for res, args in zip(task.starmap_items(batch, queue=queue), batch):
                submits[res.id] = t_submit
                argmap[res.id] = args
            i = due
            last_send = now
        wake = max(start + i * interval, last_send + burst_tick)
        delay = wake - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
    return submits, argmap


def latency_run(cfg: Config, r: Any, task: Any, queue: str, worker: Worker, *, n: int | None,
                interval: float, duration: float | None = None, skip_s: float = 0.0,
                burst_tick: float | None = None) -> dict[str, Any]:
    with ResultListener(cfg.redis_url) as listener:
        t_begin = time.time()
        submits, argmap = paced_send(task, queue, n, interval, duration, burst_tick)
        t_sent = time.time()
        ids = list(submits)
        done = wait_for_results(r, ids, timeout=30, worker=worker)
        time.sleep(0.05)  # let the last PUBLISH reach the listener
        seen = listener.collect()
    metas = fetch_results(r, ids)
    verify_results(f"latency[{task.name}]", metas, ids, [x + y for x, y in (argmap[i] for i in ids)])
    lat = [(seen[i] - submits[i]) * 1000 for i in ids
           if i in seen and submits[i] - t_begin >= skip_s]
    unheard = sum(1 for i in ids if i not in seen)
    heard = [seen[i] for i in ids if i in seen]
    # Where the time goes: submit -> result computed by the worker (its date_done, set just
    # before the store) and the rest (store + PUBLISH + delivery to the listener).
    stored = [(date_done_ts(m) - submits[i]) * 1000 for i, m in zip(ids, metas)
              if m and submits[i] - t_begin >= skip_s]
    return {"stored_p50": percentile(stored, 50), "stored_p99": percentile(stored, 99),"n": len(ids), "done": done, "unheard": unheard,
            "rate": len(ids) / max(1e-9, t_sent - t_begin),
            # Items completed per second over the whole run: below ``rate``, a backlog built up.
            "done_rate": len(heard) / max(1e-9, max(heard or [t_begin]) - t_begin),
            "p50": percentile(lat, 50), "p99": percentile(lat, 99), "max": max(lat or [float("nan")]),
            "samples": len(lat)}


def section_latency(cfg: Config, rep: Report) -> None:
    log("== latency: result ready − submit (Redis pub/sub listener in its own process) ==")
    from benchmarks.apps import bench_batched, bench_plain

    r = redis_client(cfg.redis_url)
    r.flushdb()
    drain = (rep.data.get("drain") or {}).get("batched")
    if drain:
        max_rate = drain["rate"]
    else:
        log("  (no drain result this run: measuring max throughput with a short drain first)")
        max_rate = drain_once(cfg, "batched", "benchmarks.apps.bench_batched",
                              bench_batched.add.name, max(1000, cfg.drain_items // 2),
                              stats_app=bench_batched.app)["rate"]
        r.flushdb()
    load_rate = max_rate * cfg.load_fraction
    per_item_ms = 1000.0 / max_rate
    queue = "bench.latency"
    results: dict[int, dict[str, Any]] = {}
    # Under load, items go out with starmap_items every 2 ms (one Python process can't reach
    # thousands of apply_async calls per second next to a busy worker on a small machine).
    burst_tick = 0.002 if hasattr(bench_batched.add, "starmap_items") else None
    how = (f"starmap_items every {burst_tick * 1000:.0f} ms (~{load_rate * burst_tick:.0f} items per call)"
           if burst_tick else "one apply_async per item")
    log(f"  load: {load_rate:,.0f} items/s = {cfg.load_fraction:.0%} of the drain throughput "
        f"({max_rate:,.0f}/s), sent with {how}")
    with Worker("benchmarks.apps.bench_batched", queue, "latency-batched", cfg.redis_url).start() as w:
        # Warm up every task (child imports, connections, first batch).
        warm = [t.apply_async((1, 1), queue=queue) for t in bench_batched.LATENCY_TASKS.values()]
        for res in warm:
            res.get(timeout=30)
        for wait_ms, task in bench_batched.LATENCY_TASKS.items():
            spacing = max(0.020, (wait_ms + 30) / 1000)
            idle = latency_run(cfg, r, task, queue, w, n=cfg.latency_idle_items, interval=spacing)
            log(f"  wait_ms={wait_ms:>2} idle ({idle['n']} items, one every {spacing * 1000:.0f} ms): "
                f"p50 {idle['p50']:.1f} ms, p99 {idle['p99']:.1f} ms, max {idle['max']:.1f} ms "
                f"-> overhead p50 {idle['p50'] - wait_ms:.1f}, p99 {idle['p99'] - wait_ms:.1f} ms "
                f"(submit -> worker's date_done: p50 {idle['stored_p50']:.1f} ms)")
            before = batching_stats(bench_batched.app, w.hostname, task.name)
            loaded = latency_run(cfg, r, task, queue, w, n=None, interval=1.0 / load_rate,
                                 duration=cfg.latency_load_s, skip_s=0.5, burst_tick=burst_tick)
            after = batching_stats(bench_batched.app, w.hostname, task.name)
            mb = mean_batch(after, before)
            loaded["mean_batch"] = mb
            exec_ms = (mb or 1.0) * per_item_ms
            loaded["batch_exec_ms"] = exec_ms
            loaded["target_ms"] = wait_ms + exec_ms + 5.0
            log(f"  wait_ms={wait_ms:>2} loaded (target {load_rate:,.0f}/s, sent {loaded['rate']:,.0f}/s "
                f"for {cfg.latency_load_s:.0f}s, completed {loaded['done_rate']:,.0f}/s, mean batch "
                f"{mb or float('nan'):.1f}): p50 {loaded['p50']:.1f} ms, p99 {loaded['p99']:.1f} ms, "
                f"max {loaded['max']:.1f} ms (target p99 <= {loaded['target_ms']:.1f} ms); submit -> "
                f"worker's date_done p50 {loaded['stored_p50']:.1f}, p99 {loaded['stored_p99']:.1f} ms")
            if loaded["done_rate"] < 0.9 * loaded["rate"]:
                rep.note(f"wait_ms={wait_ms} under load: the worker completed {loaded['done_rate']:,.0f} "
                         f"items/s of the {loaded['rate']:,.0f}/s sent (mean batch {mb or float('nan'):.1f})"
                         f": a backlog built up, so latency grew with the run's length")
            if idle["unheard"] or loaded["unheard"]:
                rep.note(f"wait_ms={wait_ms}: {idle['unheard'] + loaded['unheard']} result(s) stored but "
                         f"their PUBLISH was not heard by the listener (excluded from latency)")
            results[wait_ms] = {"idle": idle, "loaded": loaded}
    r.flushdb()
    plain_idle = None
    with Worker("benchmarks.apps.bench_plain", queue, "latency-plain", cfg.redis_url).start() as w:
        bench_plain.add.apply_async((1, 1), queue=queue).get(timeout=30)
        plain_idle = latency_run(cfg, r, bench_plain.add, queue, w, n=cfg.latency_idle_items,
                                 interval=0.020)
        log(f"  plain Celery idle ({plain_idle['n']} items, one every 20 ms): p50 {plain_idle['p50']:.1f} ms, "
            f"p99 {plain_idle['p99']:.1f} ms, max {plain_idle['max']:.1f} ms "
            f"(submit -> worker's date_done: p50 {plain_idle['stored_p50']:.1f} ms)")
    r.flushdb()
    r.close()
    rep.data["latency"] = {"max_rate": max_rate, "load_rate": load_rate, "per_item_ms": per_item_ms,
                           "by_wait_ms": results, "plain_idle": plain_idle}

    for wait_ms, res in results.items():
        idle, loaded = res["idle"], res["loaded"]
        rep.add(f"Idle latency wait_ms={wait_ms}, p50 / p99 (ms)",
                f"{fmt_ms(idle['p50'])} / {fmt_ms(idle['p99'])}",
                f"{fmt_ms(plain_idle['p50'])} / {fmt_ms(plain_idle['p99'])}" if wait_ms == 0 else "—")
        over99 = idle["p99"] - wait_ms
        rep.add(f"Idle overhead wait_ms={wait_ms} (latency − wait_ms), p50 / p99 (ms)",
                f"{fmt_ms(idle['p50'] - wait_ms)} / {fmt_ms(over99)}",
                f"{fmt_ms(plain_idle['p50'])} / {fmt_ms(plain_idle['p99'])}" if wait_ms == 0 else "—",
                target="p99 ≤ 3 ms", met=met(over99 <= 3.0))
        rep.add(f"Loaded latency wait_ms={wait_ms} @ {loaded['rate']:,.0f}/s "
                f"(mean batch {loaded['mean_batch'] or float('nan'):.1f}), p50 / p99 (ms)",
                f"{fmt_ms(loaded['p50'])} / {fmt_ms(loaded['p99'])}",
                target=f"p99 ≤ {wait_ms} + {loaded['batch_exec_ms']:.1f} + 5 = {loaded['target_ms']:.1f} ms",
                met=met(loaded["p99"] <= loaded["target_ms"]))


# ----------------------------------------------------------------------------------------------
# Section 3: bulk submit
# ----------------------------------------------------------------------------------------------

def section_bulk(cfg: Config, rep: Report) -> None:
    log("== bulk submit: publishing only (no worker) ==")
    from benchmarks.apps import bench_batched

    r = redis_client(cfg.redis_url)
    r.flushdb()
    task = bench_batched.add
    queue = "bench.bulk"
    task.apply_async((0, 0), queue=queue)  # connect + declare outside the timing
    r.delete(queue)

    n_loop = cfg.bulk_loop_items
    t = time.perf_counter()
    for i in range(n_loop):
        task.apply_async((i, i), queue=queue)
    loop_s = time.perf_counter() - t
    loop_rate = n_loop / loop_s
    if r.llen(queue) != n_loop:
        raise CorrectnessError(f"bulk: apply_async loop left {r.llen(queue)} messages, expected {n_loop}")
    r.delete(queue)
    log(f"  apply_async loop: {n_loop:,} items in {loop_s:.2f}s -> {loop_rate:,.0f} items/s")

    bulk_rate: float | None = None
    n_bulk = cfg.bulk_items
    if hasattr(task, "starmap_items"):
        arg_tuples = [(i, 7 * i) for i in range(n_bulk)]
        t = time.perf_counter()
        results = task.starmap_items(arg_tuples, queue=queue)
        bulk_s = time.perf_counter() - t
        bulk_rate = n_bulk / bulk_s
        log(f"  starmap_items: {n_bulk:,} items in {bulk_s:.2f}s -> {bulk_rate:,.0f} items/s")
        # Correctness: one AsyncResult per item, in order, and one message per item on the queue.
        results = list(results)
        if len(results) != n_bulk:
            raise CorrectnessError(f"bulk: starmap_items returned {len(results)} results for {n_bulk} items")
        queued = r.lrange(queue, 0, -1)
        by_id = {}
        for raw in queued:
            env = json.loads(raw)
            body = env["body"]
            if env["properties"].get("body_encoding") == "base64":
                body = base64.b64decode(body)
            by_id[env["headers"]["id"]] = tuple(json.loads(body)[0])
        if len(queued) != n_bulk or len(by_id) != n_bulk:
            raise CorrectnessError(f"bulk: {len(queued)} messages ({len(by_id)} distinct ids) on the "
                                   f"queue after starmap_items of {n_bulk}")
        wrong = [k for k, (res, args) in enumerate(zip(results, arg_tuples))
                 if by_id.get(res.id) != args]
        if wrong:
            raise CorrectnessError(f"bulk: {len(wrong)} AsyncResult(s) don't match their item's message "
                                   f"(first at index {wrong[0]})")
    else:
        rep.note("BatchedTask.starmap_items: not available in this checkout (bulk submit skipped)")
        log("  starmap_items: not available")
    r.flushdb()  # purge
    r.close()
    rep.data["bulk"] = {"loop_rate": loop_rate, "bulk_rate": bulk_rate}
    rep.add(f"Bulk submit, items/s (starmap_items ×{n_bulk:,} vs apply_async loop ×{n_loop:,})",
            fmt_rate(bulk_rate) if bulk_rate else "not available", fmt_rate(loop_rate),
            ratio=f"{fmt_ratio(bulk_rate, loop_rate)} vs loop" if bulk_rate else "n/a",
            target="≥ 20,000/s", met=met(bulk_rate >= 20_000) if bulk_rate else "—")


# ----------------------------------------------------------------------------------------------
# Section 4: embeddings (example project)
# ----------------------------------------------------------------------------------------------

_SUBJECTS = ["The committee", "A small dog", "My neighbour", "The new GPU", "Our database",
             "The morning train", "A quiet student", "The old lighthouse", "This recipe",
             "The weather service", "A busy restaurant", "The football team", "Her grandmother"]
_VERBS = ["announced", "chased", "repaired", "ignored", "predicted", "celebrated", "painted",
          "delayed", "translated", "measured", "forgot", "recommended", "questioned"]
_OBJECTS = ["the quarterly budget", "a red ball in the park", "the broken bicycle",
            "every warning about the storm", "a faster checkout process", "the winning goal",
            "an unusual sunset over the harbour", "the final chapter of the novel",
            "three kilograms of flour", "a long list of complaints", "the results of the survey"]
_TAILS = ["yesterday.", "before lunch.", "without telling anyone.", "for the third time.",
          "after a long discussion.", "despite the rain.", "in under an hour.", "again.",
          "with great enthusiasm.", "while everyone watched."]


def make_sentences(n: int, seed: int = 1234) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}"
            for _ in range(n)]


def _cosine(a: Sequence[float], b: Sequence[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    na = math.sqrt(sum(x * x for x in a))
    nb = math.sqrt(sum(y * y for y in b))
    return dot / (na * nb) if na and nb else 0.0


def section_embed(cfg: Config, rep: Report) -> None:
    log("== embed: example_project (all-MiniLM-L6-v2) ==")
    os.environ["CELERY_BROKER_URL"] = cfg.redis_url
    os.environ["CELERY_RESULT_BACKEND"] = cfg.redis_url
    try:
        from example_project import model as ex_model
        from example_project import tasks as ex_tasks
        from example_project.celery_app import QUEUE
        embed, embed_one = ex_tasks.embed, ex_tasks.embed_one
        load_model, encode = ex_model.load_model, ex_model.encode
    except (ImportError, AttributeError) as exc:
        msg = f"example_project not available ({exc!r}): embed section skipped"
        log(f"  {msg}")
        rep.note(msg)
        rep.add("Embed (example_project)", "skipped", "skipped", target="see notes")
        return
    if embed.app.conf.broker_url != cfg.redis_url:
        embed.app.conf.update(broker_url=cfg.redis_url, result_backend=cfg.redis_url)
    import torch

    if cfg.embed_threads:  # this process and (through the environment) the worker's pool process
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(cfg.embed_threads)
        torch.set_num_threads(cfg.embed_threads)
    threads = torch.get_num_threads()
    r = redis_client(cfg.redis_url)
    r.flushdb()
    texts = make_sentences(cfg.embed_items)
    batch = int(getattr(embed, "max_batch_size", 32))

    t = time.perf_counter()
    model = load_model()
    device = str(getattr(model, "device", "?"))
    log(f"  model loaded in-process in {time.perf_counter() - t:.1f}s on {device} "
        f"(torch CPU threads: {threads}{'' if cfg.embed_threads else ', the default'})")
    encode(model, texts[:batch])  # warm-up
    encode(model, texts[:1])
    t = time.perf_counter()
    reference: list[list[float]] = []
    for i in range(0, len(texts), batch):
        reference.extend(encode(model, texts[i:i + batch]))
    direct_batch_rate = len(texts) / (time.perf_counter() - t)
    n_one = min(len(texts), cfg.embed_one_items)  # one-at-a-time paths: a subset (they're slow)
    t = time.perf_counter()
    for s in texts[:n_one]:
        encode(model, [s])
    direct_one_rate = n_one / (time.perf_counter() - t)
    log(f"  direct, batches of {batch}: {direct_batch_rate:,.0f} sentences/s ({len(texts)}); "
        f"direct, one at a time: {direct_one_rate:,.0f} sentences/s ({n_one})")
    del model
    try:
        import gc

        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001
        pass

    def through_worker(task: Any, w: Worker, texts: Sequence[str], bulk: bool = False
                       ) -> tuple[float, list[dict[str, Any] | None], list[str]]:
        t0 = time.time()
        if bulk:
            ids = [res.id for res in task.map_items(texts, queue=QUEUE)]
        else:
            ids = [str(uuid.uuid4()) for _ in texts]
            for tid, s in zip(ids, texts):
                task.apply_async((s,), task_id=tid, queue=QUEUE)
        done = wait_for_results(r, ids, timeout=cfg.embed_timeout, worker=w, interval=0.02)
        if done < len(ids):
            raise CorrectnessError(f"embed[{task.name}]: only {done} of {len(ids)} results after "
                                   f"{cfg.embed_timeout}s")
        metas = fetch_results(r, ids)
        end = max(date_done_ts(m) for m in metas if m)
        return len(ids) / (end - t0), metas, ids

    def close(a: Any, b: Any) -> bool:
        return isinstance(a, list) and len(a) == len(b) and _cosine(a, b) > 0.999

    with Worker("benchmarks.apps.bench_example", QUEUE, "embed", cfg.redis_url).start(timeout=300) as w:
        t = time.perf_counter()
        embed.apply_async(("warm up",), queue=QUEUE).get(timeout=300)
        embed_one.apply_async(("warm up",), queue=QUEUE).get(timeout=300)
        log(f"  worker ready; model loaded in its pool process in {time.perf_counter() - t:.1f}s")
        before = batching_stats(embed.app, w.hostname, embed.name)
        loop_rate, metas, ids = through_worker(embed, w, texts)
        after = batching_stats(embed.app, w.hostname, embed.name)
        verify_results(f"embed[{embed.name}]", metas, ids, reference, check=close)
        mb_loop = mean_batch(after, before)
        log(f"  batched task, sent with an apply_async loop: {loop_rate:,.0f} sentences/s "
            f"(mean batch {mb_loop or float('nan'):.1f})")
        r.delete(*result_keys(ids))
        if hasattr(embed, "map_items"):
            before = after
            batched_rate, metas, ids = through_worker(embed, w, texts, bulk=True)
            after = batching_stats(embed.app, w.hostname, embed.name)
            verify_results(f"embed[{embed.name}] (map_items)", metas, ids, reference, check=close)
            mb = mean_batch(after, before)
            log(f"  batched task, sent with map_items: {batched_rate:,.0f} sentences/s "
                f"(mean batch {mb or float('nan'):.1f})")
            r.delete(*result_keys(ids))
        else:
            log("  map_items: not available (the apply_async loop number is used)")
            batched_rate, mb = loop_rate, mb_loop
        per_item_rate, metas, ids = through_worker(embed_one, w, texts[:n_one])
        verify_results(f"embed[{embed_one.name}]", metas, ids, reference[:n_one], check=close)
        log(f"  embed_one per item through the worker: {per_item_rate:,.0f} sentences/s ({n_one})")
    r.flushdb()
    r.close()
    rep.data["embed"] = {"device": device, "n": len(texts), "n_one": n_one, "torch_threads": threads,
                         "direct_batch": direct_batch_rate,
                         "direct_one": direct_one_rate, "batched": batched_rate,
                         "per_item": per_item_rate, "mean_batch": mb, "batched_loop_submit": loop_rate,
                         "mean_batch_loop_submit": mb_loop}
    rep.add(f"Embed {len(texts)} sentences ({device}, {threads} torch thread(s)), sentences/s end to end (submit → last result): "
            f"batched `embed` (map_items; apply_async loop) vs `embed_one` per item ({n_one})",
            f"{fmt_rate(batched_rate)} ({fmt_rate(loop_rate)})", fmt_rate(per_item_rate),
            ratio=f"{fmt_ratio(batched_rate, per_item_rate)} vs per item",
            target="≥ 3×", met=met(batched_rate >= 3 * per_item_rate))
    rep.add(f"Embed: direct in-process, batches of {batch} / one at a time, sentences/s",
            f"{fmt_rate(direct_batch_rate)} / {fmt_rate(direct_one_rate)}",
            ratio=f"batched task = {100 * batched_rate / direct_batch_rate:.0f}% of direct batch-{batch}",
            target="≥ 90%", met=met(batched_rate >= 0.9 * direct_batch_rate))


# ----------------------------------------------------------------------------------------------
# Section 5: worker RSS over a large drain
# ----------------------------------------------------------------------------------------------

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
            ids = []
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


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------

@dataclass
class Config:
    redis_url: str
    quick: bool
    repeat: int
    drain_items: int
    drain_timeout: float
    latency_idle_items: int
    latency_load_s: float
    load_fraction: float
    bulk_items: int
    bulk_loop_items: int
    embed_items: int
    embed_one_items: int
    embed_threads: int
    embed_timeout: float
    rss_items: int
    rss_cap_s: float
    install_cbatches: bool


def environment() -> dict[str, str]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = "none"
    torch_v = "not installed"
    try:
        import torch

        torch_v = torch.__version__
        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001
        pass
    import celery
    import kombu

    try:
        rv = redis_client(os.environ.get("BENCH_BROKER_URL", "redis://127.0.0.1:6379/13")).info("server")["redis_version"]
    except Exception:  # noqa: BLE001
        rv = "?"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "celery_batched"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        commit += " (celery_batched/ modified)" if dirty else ""
    except Exception:  # noqa: BLE001
        commit = "?"
    return {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "uname -m": platform.machine(),
        "CPU": f"{cpu} ({os.cpu_count()} logical CPUs)",
        "GPU": gpu,
        "Python": platform.python_version(),
        "versions": f"celery {celery.__version__}, kombu {kombu.__version__}, redis-server {rv}, torch {torch_v}",
        "commit": commit,
    }


def render(rep: Report, env: dict[str, str], cfg: Config, sections: Sequence[str]) -> str:
    lines = ["# celery_batched benchmarks", ""]
    lines += [f"- **{k}**: {v}" for k, v in env.items()]
    lines += [f"- **run**: {'--quick ' if cfg.quick else ''}sections {', '.join(sections)}; "
              f"one `celery worker -P prefork -c 1` per measurement; Redis broker + result backend "
              f"({cfg.redis_url})", ""]
    header = ["metric", "celery_batched", "plain Celery", "celery-batches 0.11", "ratio", "target", "met?"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---" for _ in header) + "|")
    for row in rep.rows:
        cells = [row.metric, row.batched, row.plain, row.cbatches, row.ratio, row.target, row.met]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    if rep.load:
        lines += ["", "Other programs' CPU use while each section ran (this machine is shared; "
                  f"{os.cpu_count()} CPUs): " + ", ".join(
                      f"{k} {o:.2f} CPUs" + (f" (+{st:.2f} steal)" if st >= 0.01 else "")
                      for k, (o, st) in rep.load.items())]
    if rep.notes:
        lines += ["", "Notes:"] + [f"- {n}" for n in rep.notes]
    lines += ["", f"Correctness: {'all checks passed' if not rep.failures else 'FAILED'}"]
    lines += [f"- FAILED: {f}" for f in rep.failures]
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> tuple[Config, list[str], argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short smoke run (small sizes)")
    p.add_argument("--only", default="", help=f"comma-separated sections: {', '.join(SECTIONS)}")
    p.add_argument("--out", type=Path, help="also write the final table (markdown) to this file")
    p.add_argument("--json", type=Path, help="also write every measured number (JSON) to this file")
    p.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/13"),
                   help="broker and result backend (FLUSHDB'd!); default redis://127.0.0.1:6379/13")
    p.add_argument("--drain-items", type=int, help="items per drain run (default 5000; quick 1000)")
    p.add_argument("--repeat", type=int, default=1, help="drain runs per library; the median is reported")
    p.add_argument("--load-fraction", type=float, default=0.5,
                   help="loaded latency: arrival rate as a fraction of the drain throughput (default 0.5)")
    p.add_argument("--rss-items", type=int, help="items for the RSS drain (default 200000; quick 20000)")
    p.add_argument("--rss-cap", type=float, help="stop sampling the RSS drain after this many seconds (default 90)")
    p.add_argument("--embed-items", type=int, help="sentences for the embed section (default 256; quick 64); "
                   "the one-at-a-time paths use the first 128 (quick 32)")
    p.add_argument("--embed-threads", type=int, default=0,
                   help="torch CPU threads for the embed section, in this process and in the worker "
                        "(default: torch's own choice, all cores)")
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
        drain_items=a.drain_items or (1_000 if q else 5_000),
        drain_timeout=120.0 if q else 300.0,
        latency_idle_items=30 if q else 150,
        latency_load_s=1.5 if q else 4.0,
        load_fraction=a.load_fraction,
        bulk_items=5_000 if q else 20_000,
        bulk_loop_items=1_000 if q else 5_000,
        embed_items=a.embed_items or (64 if q else 256),
        embed_one_items=32 if q else 128,
        embed_threads=a.embed_threads,
        embed_timeout=300.0,
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
    runners = {"drain": section_drain, "latency": section_latency, "bulk": section_bulk,
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
