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
import base64
import contextlib
import datetime as dt
import gc
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
from collections.abc import Callable, Iterable, Iterator, Sequence
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
SECTIONS = ("drain", "gpusim", "latency", "bulk", "embed", "rss")
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/13"

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
        self.redis = find_redis_server()

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


def find_redis_server(url: str | None = None) -> Any:
    """The psutil process of the redis-server the benchmark uses (matched by its port: other
    redis-servers may run on the machine, e.g. the tests' own), or None."""
    from urllib.parse import urlparse

    import psutil

    port = urlparse(url or os.environ.get("BENCH_BROKER_URL") or DEFAULT_REDIS_URL).port or 6379
    servers = [p for p in psutil.process_iter(["name", "cmdline"])
               if (p.info["name"] or "").startswith("redis-server")]
    for proc in servers:
        if any(f":{port}" in part or part == str(port) for part in proc.info["cmdline"] or ()):
            return proc
    return servers[0] if len(servers) == 1 else None


def _cpu_seconds(proc: Any) -> float:
    try:
        t = proc.cpu_times()
        return float(t.user + t.system)
    except Exception:  # noqa: BLE001  (gone, or not ours to read)
        return 0.0


class ProcessCpu:
    """CPU time by process over a measured window, in µs per item (psutil, 10 ms ticks).

    Roles: ``consumer`` (the worker's main process), ``pool`` (its pool processes), ``redis``
    (redis-server) and ``client`` (this benchmark process, plus any other child of it: a sender
    or listener subprocess, live or reaped during the window). Created at the window's start;
    ``per_item(n)`` at its end.
    """

    ROLES = ("consumer", "pool", "redis", "client")

    def __init__(self, worker: Worker | None = None, redis_proc: Any = None) -> None:
        self.worker = worker
        self.redis = redis_proc if redis_proc is not None else find_redis_server()
        self.start = self.sample()

    def sample(self) -> dict[str, float]:
        import psutil

        worker_procs = self.worker.processes() if self.worker else []
        worker_pids = {p.pid for p in worker_procs}
        me = psutil.Process()
        t = os.times()
        client = _cpu_seconds(me) + t.children_user + t.children_system
        for child in me.children(recursive=True):
            if child.pid not in worker_pids:
                client += _cpu_seconds(child)
        return {
            "consumer": _cpu_seconds(worker_procs[0]) if worker_procs else 0.0,
            "pool": sum(_cpu_seconds(p) for p in worker_procs[1:]),
            "redis": _cpu_seconds(self.redis) if self.redis is not None else float("nan"),
            "client": client,
        }

    def per_item(self, n: int) -> dict[str, float]:
        end = self.sample()
        out = {k: (end[k] - self.start[k]) * 1e6 / max(1, n) for k in self.ROLES}
        if self.worker is None:
            out["consumer"] = out["pool"] = float("nan")
        return out


def fmt_cpu(us: dict[str, float] | None) -> str:
    """'consumer / pool / redis-server / client' µs per item."""
    if not us:
        return "n/a"
    return " / ".join("—" if math.isnan(us[k]) else f"{us[k]:.0f}" for k in ProcessCpu.ROLES)


CPU_LABEL = "CPU µs per item — consumer / pool / redis-server / client"


def _kill_all_workers() -> None:
    for w in list(_WORKERS):
        try:
            w.stop(timeout=5)
        except Exception:  # noqa: BLE001
            pass


def _on_signal(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def batching_stats(app: Any, hostname: str, task_name: str) -> dict[str, Any] | None:
    """``celery_batched.batching_stats`` for one worker and task, or None when unavailable."""
    import celery_batched

    for attempt in range(3):
        try:
            replies = celery_batched.batching_stats(app, timeout=2.0, destination=[hostname])
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
    sizes = sorted(((int(k), v) for k, v in stats["batch_sizes"]), key=lambda kv: -kv[1])
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


# ----------------------------------------------------------------------------------------------
# Section 2: simulated GPU model (a batched call that sleeps), vector results
# ----------------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------------
# Section 3: latency
# ----------------------------------------------------------------------------------------------

def _listener(url: str, conn: Any, ready: Any, stop: Any) -> None:
    """Subprocess: time.time() at which each result's PUBLISH arrives (Redis backend pub/sub).

    A raw socket read in large chunks and parsed with hiredis: redis-py's ``get_message`` costs
    tens of µs per message, and at the loaded rates (10,000+ results/s) that listener took most
    of a core away from the worker it measures on a 2-core machine. Each message is stamped with
    the time its chunk was read: never earlier than its arrival, so latency is not understated.
    """
    import socket
    from urllib.parse import unquote, urlparse

    import hiredis

    u = urlparse(url)
    sock = socket.create_connection((u.hostname or "127.0.0.1", u.port or 6379), timeout=5)
    reader = hiredis.Reader()

    def reply() -> Any:
        while (msg := reader.gets()) is False:
            reader.feed(sock.recv(65536))
        return msg

    if u.password:
        auth = [unquote(u.username).encode()] if u.username else []
        sock.sendall(hiredis.pack_command((b"AUTH", *auth, unquote(u.password).encode())))
        if isinstance(reply(), Exception):
            raise RuntimeError("result listener: AUTH refused")
    sock.sendall(hiredis.pack_command((b"PSUBSCRIBE", RESULT_PREFIX.encode() + b"*")))
    while not (isinstance(msg := reply(), list) and msg[0] == b"psubscribe"):
        pass
    ready.set()
    sock.settimeout(0.05)
    seen: dict[str, float] = {}
    cut = len(RESULT_PREFIX)
    while not stop.is_set():
        try:
            data = sock.recv(1 << 20)
        except TimeoutError:
            continue
        if not data:
            break
        now = time.time()
        reader.feed(data)
        while (msg := reader.gets()) is not False:
            if isinstance(msg, list) and msg[0] == b"pmessage":
                seen[msg[2][cut:].decode()] = now
    sock.close()
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


@dataclass
class TimedItems:
    """Items sent during one listening window: submit times, PUBLISH-heard times, metas."""
    submits: dict[str, float]
    seen: dict[str, float]
    metas: dict[str, dict[str, Any] | None]
    group: dict[str, str]
    t_begin: float
    t_sent: float

    def ids(self, group: str | None = None) -> list[str]:
        return [i for i in self.submits if group is None or self.group.get(i) == group]


Sent = tuple[dict[str, float], dict[str, tuple[int, int]], dict[str, str]]


def send_and_listen(cfg: Config, r: Any, worker: Worker, send: Callable[[], Sent],
                    what: str) -> TimedItems:
    """Run ``send`` (-> submit times, each item's args, each item's group) while a subscriber
    process notes when each result's PUBLISH arrives; wait for every result and check it."""
    with ResultListener(cfg.redis_url) as listener:
        t_begin = time.time()
        submits, argmap, group = send()
        t_sent = time.time()
        ids = list(submits)
        wait_for_results(r, ids, timeout=30, worker=worker)
        time.sleep(0.05)  # let the last PUBLISH reach the listener
        seen = listener.collect()
    metas = fetch_results(r, ids)
    verify_results(f"latency[{what}]", metas, ids, [x + y for x, y in (argmap[i] for i in ids)])
    return TimedItems(submits, seen, dict(zip(ids, metas)), group, t_begin, t_sent)


def latency_stats(t: TimedItems, ids: Sequence[str], skip_s: float = 0.0) -> dict[str, Any]:
    """p50/p99/max of result heard − submit (ms) over ``ids``, leaving out the first ``skip_s``."""
    counted = [i for i in ids if t.submits[i] - t.t_begin >= skip_s]
    lat = [(t.seen[i] - t.submits[i]) * 1000 for i in counted if i in t.seen]
    heard = [t.seen[i] for i in ids if i in t.seen]
    # Where the time goes: submit -> result computed by the worker (its date_done, set just
    # before the store) and the rest (store + PUBLISH + delivery to the listener).
    stored = [(date_done_ts(m) - t.submits[i]) * 1000 for i in counted if (m := t.metas[i])]
    return {"n": len(ids), "samples": len(lat), "unheard": sum(1 for i in ids if i not in t.seen),
            "p50": percentile(lat, 50), "p99": percentile(lat, 99), "max": max(lat or [float("nan")]),
            "stored_p50": percentile(stored, 50), "stored_p99": percentile(stored, 99),
            "rate": len(ids) / max(1e-9, t.t_sent - t.t_begin),
            # Items completed per second over the whole run: below ``rate``, a backlog built up.
            "done_rate": len(heard) / max(1e-9, max(heard or [t.t_begin]) - t.t_begin)}


def interleaved_send(tasks: Sequence[tuple[str, Any, float]], queue: str, rounds: int) -> Sent:
    """Idle load: single items, one task after the other (shuffled order in each round), each
    sent ``max(15, wait_ms + 15)`` ms after the previous one, so no two share a batch and each
    finds the worker idle."""
    submits: dict[str, float] = {}
    argmap: dict[str, tuple[int, int]] = {}
    group: dict[str, str] = {}
    rng = random.Random(42)
    i = 0
    next_at = time.perf_counter()
    for _ in range(rounds):
        order = list(tasks)
        rng.shuffle(order)
        for label, task, wait_ms in order:
            delay = next_at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            tid, args = str(uuid.uuid4()), (i, 3 * i)
            submits[tid] = time.time()
            task.apply_async(args, task_id=tid, queue=queue)
            argmap[tid], group[tid] = args, label
            i += 1
            next_at = time.perf_counter() + max(0.015, (wait_ms + 15) / 1000)
    return submits, argmap, group


@contextlib.contextmanager
def sender_heap_frozen() -> Iterator[None]:
    """The benchmark process's own objects out of its full GC passes while it paces items."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@sender_heap_frozen()
def paced_send(task: Any, queue: str, n: int | None, interval: float, duration: float | None = None,
               burst_tick: float | None = None) -> Sent:
    """Send items at one per ``interval`` seconds (n items, or for ``duration`` seconds).

    One ``apply_async`` per item; or, with ``burst_tick``, every ``burst_tick`` seconds one
    ``starmap_items`` call with the items due by then (cheaper per item: one Python sender can
    then reach rates an ``apply_async`` loop can't). Each item's submit time is taken just
    before the call that sends it. This process's heap is frozen meanwhile, as the worker's
    is: a full collection of it once stalled the sender ~100 ms inside a call on 2 cores, and
    that call's items then measured the sender's pause, not the worker.
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
    return submits, argmap, {tid: task.name for tid in submits}


IDLE_OVERHEAD_TARGET_MS = 0.5


def _fmt_pair(d: dict[str, Any] | None) -> str:
    return f"{fmt_ms(d['p50'])} / {fmt_ms(d['p99'])}" if d else "n/a"


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
    # Under load, items go out with starmap_items every 2 ms (one Python process can't reach
    # thousands of apply_async calls per second next to a busy worker on a small machine).
    burst_tick = 0.002 if hasattr(bench_batched.add, "starmap_items") else None
    how = (f"starmap_items every {burst_tick * 1000:.0f} ms (~{load_rate * burst_tick:.0f} items per call)"
           if burst_tick else "one apply_async per item")
    ordinary = bench_batched.plain_add
    idle_tasks = [("ordinary", ordinary, 0.0),
                  *((f"w{w}", t, float(w)) for w, t in bench_batched.LATENCY_TASKS.items())]
    rounds = cfg.latency_idle_items
    loaded: dict[int, dict[str, Any]] = {}
    with Worker("benchmarks.apps.bench_batched", queue, "latency-batched", cfg.redis_url).start() as w:
        # Warm up every task (child imports, connections, first batch).
        for res in [t.apply_async((1, 1), queue=queue) for _, t, _ in idle_tasks]:
            res.get(timeout=30)
        log(f"  idle: {rounds} rounds of one item per task (the ordinary task + wait_ms "
            f"{'/'.join(str(k) for k in bench_batched.LATENCY_TASKS)}), interleaved, in one worker")
        timed = send_and_listen(cfg, r, w, lambda: interleaved_send(idle_tasks, queue, rounds), "idle")
        idle = {label: latency_stats(timed, timed.ids(label)) for label, _, _ in idle_tasks}
        base = idle["ordinary"]
        log(f"  ordinary task (same worker): p50 {base['p50']:.2f} ms, p99 {base['p99']:.2f} ms, "
            f"max {base['max']:.1f} ms (submit -> worker's date_done p50 {base['stored_p50']:.2f} ms)")
        for wait_ms in bench_batched.LATENCY_TASKS:
            d = idle[f"w{wait_ms}"]
            log(f"  wait_ms={wait_ms:>2} idle: p50 {d['p50']:.2f} ms, p99 {d['p99']:.2f} ms, max "
                f"{d['max']:.1f} ms -> batching overhead (− wait_ms − ordinary) p50 "
                f"{d['p50'] - wait_ms - base['p50']:+.2f}, p99 {d['p99'] - wait_ms - base['p99']:+.2f} ms "
                f"(submit -> worker's date_done p50 {d['stored_p50']:.2f} ms)")

        log(f"  load: {load_rate:,.0f} items/s = {cfg.load_fraction:.0%} of the drain throughput "
            f"({max_rate:,.0f}/s), sent with {how}")
        for wait_ms, task in bench_batched.LATENCY_TASKS.items():
            before = batching_stats(bench_batched.app, w.hostname, task.name)
            def send(task: Any = task) -> Sent:
                return paced_send(task, queue, None, 1.0 / load_rate, cfg.latency_load_s, burst_tick)

            timed = send_and_listen(cfg, r, w, send, task.name)
            after = batching_stats(bench_batched.app, w.hostname, task.name)
            d = latency_stats(timed, timed.ids(), skip_s=0.5)
            d["mean_batch"] = mb = mean_batch(after, before)
            d["batch_exec_ms"] = exec_ms = (mb or 1.0) * per_item_ms
            d["target_ms"] = wait_ms + exec_ms + 5.0
            log(f"  wait_ms={wait_ms:>2} loaded (target {load_rate:,.0f}/s, sent {d['rate']:,.0f}/s "
                f"for {cfg.latency_load_s:.0f}s, completed {d['done_rate']:,.0f}/s, mean batch "
                f"{mb or float('nan'):.1f}): p50 {d['p50']:.1f} ms, p99 {d['p99']:.1f} ms, "
                f"max {d['max']:.1f} ms (target p99 <= {d['target_ms']:.1f} ms); submit -> "
                f"worker's date_done p50 {d['stored_p50']:.1f}, p99 {d['stored_p99']:.1f} ms")
            if d["done_rate"] < 0.9 * d["rate"]:
                rep.note(f"wait_ms={wait_ms} under load: the worker completed {d['done_rate']:,.0f} "
                         f"items/s of the {d['rate']:,.0f}/s sent (mean batch {mb or float('nan'):.1f})"
                         f": a backlog built up, so latency grew with the run's length")
            loaded[wait_ms] = d
    unheard = sum(d["unheard"] for d in [*idle.values(), *loaded.values()])
    if unheard:
        rep.note(f"latency: {unheard} result(s) stored but their PUBLISH was not heard by the "
                 f"listener (excluded from latency)")
    r.flushdb()
    with Worker("benchmarks.apps.bench_plain", queue, "latency-plain", cfg.redis_url).start() as w:
        bench_plain.add.apply_async((1, 1), queue=queue).get(timeout=30)
        plain_tasks = [("plain", bench_plain.add, 0.0)]
        timed = send_and_listen(cfg, r, w, lambda: interleaved_send(plain_tasks, queue, rounds),
                                "plain worker")
        plain_worker = latency_stats(timed, timed.ids())
        log(f"  ordinary task in a plain Celery worker: p50 {plain_worker['p50']:.2f} ms, "
            f"p99 {plain_worker['p99']:.2f} ms, max {plain_worker['max']:.1f} ms")
    r.flushdb()
    r.close()
    rep.data["latency"] = {"max_rate": max_rate, "load_rate": load_rate, "per_item_ms": per_item_ms,
                           "idle": idle, "loaded": loaded, "plain_worker_idle": plain_worker}

    rep.add(f"Idle latency of an ordinary task, p50 / p99 (ms): in the celery_batched worker "
            f"(interleaved with the batched tasks) vs a plain Celery worker ({rounds} items each)",
            _fmt_pair(base), _fmt_pair(plain_worker))
    for wait_ms, d in loaded.items():
        idle_d = idle[f"w{wait_ms}"]
        over50 = idle_d["p50"] - wait_ms - base["p50"]
        over99 = idle_d["p99"] - wait_ms - base["p99"]
        rep.add(f"Idle latency wait_ms={wait_ms}, p50 / p99 (ms); plain column: the ordinary task, "
                f"same worker", _fmt_pair(idle_d), _fmt_pair(base))
        rep.add(f"Idle overhead wait_ms={wait_ms}: batched − wait_ms − ordinary task, p50 / p99 (ms)",
                f"{over50:+.2f} / {over99:+.2f}", target=f"p99 ≤ {IDLE_OVERHEAD_TARGET_MS} ms",
                met=met(over99 <= IDLE_OVERHEAD_TARGET_MS))
        rep.add(f"Loaded latency wait_ms={wait_ms} @ {d['rate']:,.0f}/s "
                f"(mean batch {d['mean_batch'] or float('nan'):.1f}), p50 / p99 (ms)",
                _fmt_pair(d),
                target=f"p99 ≤ {wait_ms} + {d['batch_exec_ms']:.1f} + 5 = {d['target_ms']:.1f} ms",
                met=met(d["p99"] <= d["target_ms"]))


# ----------------------------------------------------------------------------------------------
# Section 4: bulk submit, and reading many results back
# ----------------------------------------------------------------------------------------------

BULK_TARGET = 50_000


def check_queued(r: Any, queue: str, results: Sequence[Any], arg_tuples: Sequence[tuple[int, int]],
                 what: str) -> None:
    """One message per item on ``queue``, and each returned AsyncResult is its item's message."""
    results = list(results)
    if len(results) != len(arg_tuples):
        raise CorrectnessError(f"{what}: {len(results)} results for {len(arg_tuples)} items")
    queued = r.lrange(queue, 0, -1)
    by_id = {}
    for raw in queued:
        env = json.loads(raw)
        body = env["body"]
        if env["properties"].get("body_encoding") == "base64":
            body = base64.b64decode(body)
        by_id[env["headers"]["id"]] = tuple(json.loads(body)[0])
    if len(queued) != len(arg_tuples) or len(by_id) != len(arg_tuples):
        raise CorrectnessError(f"{what}: {len(queued)} messages ({len(by_id)} distinct ids) on the "
                               f"queue for {len(arg_tuples)} items")
    wrong = [k for k, (res, args) in enumerate(zip(results, arg_tuples)) if by_id.get(res.id) != args]
    if wrong:
        raise CorrectnessError(f"{what}: {len(wrong)} AsyncResult(s) don't match their item's "
                               f"message (first at index {wrong[0]})")


def timed_starmap(r: Any, task: Any, queue: str, n: int, what: str) -> dict[str, Any]:
    """``starmap_items`` of n items to an empty queue: items/s, CPU per item; checked, purged."""
    arg_tuples = [(i, 7 * i) for i in range(n)]
    task.starmap_items([(0, 0)] * 100, queue=queue)  # one-time costs (scripts, paths) untimed
    r.delete(queue)
    gc.collect()
    cpu = ProcessCpu(None)
    t = time.perf_counter()
    results = task.starmap_items(arg_tuples, queue=queue)
    seconds = time.perf_counter() - t
    out: dict[str, Any] = {"n": n, "rate": n / seconds, "cpu_us": cpu.per_item(n)}
    log(f"  {what}: {n:,} items in {seconds:.2f}s -> {out['rate']:,.0f} items/s; "
        f"{CPU_LABEL}: {fmt_cpu(out['cpu_us'])}")
    check_queued(r, queue, results, arg_tuples, f"bulk[{what}]")
    r.delete(queue)
    return out


def timed_results_get(cfg: Config, r: Any, n: int) -> dict[str, Any]:
    """``map_items`` of n items, a worker stores every result, then only ``.get()`` is timed."""
    from benchmarks.apps import bench_batched

    queue = "bench.bulk.get"
    xs = list(range(n))
    results = bench_batched.inc.map_items(xs, queue=queue)
    ids = [res.id for res in results]
    with Worker("benchmarks.apps.bench_batched", queue, "bulk-get", cfg.redis_url).start() as w:
        done = wait_for_results(r, ids, timeout=cfg.drain_timeout, worker=w)
        if done < n:
            raise CorrectnessError(f"bulk[get]: only {done} of {n} results stored")
        gc.collect()
        cpu = ProcessCpu(w)
        t = time.perf_counter()
        values = results.get(timeout=cfg.drain_timeout)
        seconds = time.perf_counter() - t
        out: dict[str, Any] = {"n": n, "rate": n / seconds, "cpu_us": cpu.per_item(n)}
    if values != [x + 1 for x in xs]:
        raise CorrectnessError("bulk[get]: ItemResults.get() returned wrong values")
    log(f"  ItemResults.get() of {n:,} stored results: {seconds:.2f}s -> {out['rate']:,.0f} results/s; "
        f"{CPU_LABEL}: {fmt_cpu(out['cpu_us'])}")
    r.flushdb()
    return out


def section_bulk(cfg: Config, rep: Report) -> None:
    log("== bulk: submit (no worker), and reading stored results back ==")
    from benchmarks.apps import bench_batched

    r = redis_client(cfg.redis_url)
    r.flushdb()
    task = bench_batched.add
    queue = "bench.bulk"
    task.apply_async((0, 0), queue=queue)  # connect + declare outside the timing
    r.delete(queue)

    n_loop = cfg.bulk_loop_items
    gc.collect()
    cpu = ProcessCpu(None)
    t = time.perf_counter()
    for i in range(n_loop):
        task.apply_async((i, i), queue=queue)
    loop: dict[str, Any] = {"n": n_loop, "rate": n_loop / (time.perf_counter() - t), "cpu_us": cpu.per_item(n_loop)}
    if r.llen(queue) != n_loop:
        raise CorrectnessError(f"bulk: apply_async loop left {r.llen(queue)} messages, expected {n_loop}")
    r.delete(queue)
    log(f"  apply_async loop: {n_loop:,} items -> {loop['rate']:,.0f} items/s; "
        f"{CPU_LABEL}: {fmt_cpu(loop['cpu_us'])}")
    res: dict[str, Any] = {"loop": loop}
    n = cfg.bulk_items
    if hasattr(task, "starmap_items"):
        res["starmap"] = timed_starmap(r, task, queue, n, "starmap_items, task_send_sent_event=False")
        conf = task.app.conf
        saved = conf.task_send_sent_event
        conf.task_send_sent_event = True
        try:
            res["starmap_sent_event"] = timed_starmap(r, task, queue, n,
                                                      "starmap_items, task_send_sent_event=True")
        finally:
            conf.task_send_sent_event = saved
        res["get"] = timed_results_get(cfg, r, n)
    else:
        rep.note("BatchedTask.starmap_items: not available in this checkout (bulk submit skipped)")
        log("  starmap_items: not available")
    r.flushdb()
    r.close()
    rep.data["bulk"] = res

    rows = [("starmap", f"Bulk submit: starmap_items ×{n:,}, task_send_sent_event=False, items/s "
                        f"(plain column: apply_async loop ×{n_loop:,})"),
            ("starmap_sent_event", f"Bulk submit: starmap_items ×{n:,}, task_send_sent_event=True, "
                                   f"items/s (plain column: apply_async loop)"),
            ("get", f"ItemResults.get() over {n:,} stored map_items results, results/s")]
    for key, metric in rows:
        d = res.get(key)
        if d is None:
            rep.add(metric, "not available")
            continue
        loop_cell = fmt_rate(loop["rate"]) if key != "get" else "—"
        rep.add(metric, fmt_rate(d["rate"]), loop_cell,
                ratio=f"{fmt_ratio(d['rate'], loop['rate'])} vs loop" if key != "get" else "—",
                target=f"≥ {BULK_TARGET:,}/s", met=met(d["rate"] >= BULK_TARGET))
        rep.add(f"Bulk ({key}): {CPU_LABEL}", fmt_cpu(d["cpu_us"]),
                fmt_cpu(loop["cpu_us"]) if key != "get" else "—")


# ----------------------------------------------------------------------------------------------
# Section 5: embeddings (example project)
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

EMBED_SWEEP = (1, 8, 16, 32, 64, 128, 256)
EMBED_TARGET = 0.90  # through one worker vs the model called directly at the same batch size


def make_sentences(n: int, seed: int = 1234) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}"
            for _ in range(n)]


def _cosine(a: Sequence[float], b: Sequence[float]) -> float:
    import numpy as np

    u, v = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    nu, nv = float(np.linalg.norm(u)), float(np.linalg.norm(v))
    return float(u @ v) / (nu * nv) if nu and nv else 0.0


def direct_sweep(encode: Callable[[Sequence[str]], Any], texts: Sequence[str],
                 sizes: Sequence[int], min_s: float, shapes: int = 16) -> dict[int, float]:
    """Sentences/s of the model called directly, per batch size, in steady state.

    Per size, up to ``shapes`` chunks of ``texts``: one untimed pass over them (the first call
    at each new input shape is slow: up to ~100 ms on CUDA, kernels load lazily), then calls
    cycling over the same chunks for at least ``min_s`` seconds and two calls.
    """
    rates: dict[int, float] = {}
    for size in sizes:
        chunks = [texts[i:i + size] for i in range(0, len(texts) - size + 1, size)][:shapes]
        chunks = chunks or [texts[:size]]
        for chunk in chunks:
            encode(chunk)
        done, calls, t = 0, 0, time.perf_counter()
        while calls < 2 or time.perf_counter() - t < min_s:
            chunk = chunks[calls % len(chunks)]
            encode(chunk)
            done += len(chunk)
            calls += 1
        rates[size] = done / (time.perf_counter() - t)
    return rates


def knee(rates: dict[int, float], share: float = 0.9) -> int:
    """The smallest batch size reaching ``share`` of the best rate in the sweep."""
    best = max(rates.values())
    return min(size for size, rate in rates.items() if rate >= share * best)


def section_embed(cfg: Config, rep: Report) -> None:
    log("== embed: example_project (all-MiniLM-L6-v2) ==")
    try:
        import torch

        cuda = torch.cuda.is_available()
        import_error: Exception | None = None
    except ImportError as exc:
        cuda, import_error = False, exc
    batch = cfg.embed_batch or (128 if cuda else 32)
    # Read by example_project when imported, here and in the worker (which inherits them).
    os.environ.update({"CELERY_BROKER_URL": cfg.redis_url, "CELERY_RESULT_BACKEND": cfg.redis_url,
                       "EXAMPLE_EMBED_BATCH_SIZE": str(batch), "EXAMPLE_RESULT_SERIALIZER": "msgpack"})
    try:
        if import_error is not None:
            raise import_error
        from example_project import model as ex_model
        from example_project import tasks as ex_tasks
        from example_project.celery_app import QUEUE
        embed, embed_one = ex_tasks.embed, ex_tasks.embed_one
        load_model, encode_array = ex_model.load_model, ex_model.encode_array
    except (ImportError, AttributeError) as exc:
        msg = f"example_project not available ({exc!r}): embed section skipped"
        log(f"  {msg}")
        rep.note(msg)
        rep.add("Embed (example_project)", "skipped", "skipped", target="see notes")
        return
    app = embed.app
    if app.conf.broker_url != cfg.redis_url:
        app.conf.update(broker_url=cfg.redis_url, result_backend=cfg.redis_url)
    serializer = app.conf.result_serializer
    if embed.max_batch_size != batch or serializer != "msgpack":
        rep.note(f"embed: example_project was imported before this section set its environment "
                 f"(max_batch_size {embed.max_batch_size}, result_serializer {serializer})")
        batch = embed.max_batch_size
    if cfg.embed_threads:  # this process and (through the environment) the worker's pool process
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(cfg.embed_threads)
        torch.set_num_threads(cfg.embed_threads)
    threads = torch.get_num_threads()
    n = cfg.embed_items or (cfg.gpu_embed_items if cuda else cfg.cpu_embed_items)
    texts = make_sentences(n)
    r = redis_client(cfg.redis_url)
    r.flushdb()

    # The model called directly, in this process, as the worker runs it (float16 on CUDA).
    t = time.perf_counter()
    model = load_model(fp16=True)
    device = f"{model.device.type} {str(model.dtype).replace('torch.', '')}"
    log(f"  model loaded in-process in {time.perf_counter() - t:.1f}s on {device} "
        f"(torch CPU threads: {threads}{'' if cfg.embed_threads else ', the default'})")
    sweep_texts = make_sentences(max(4 * max(EMBED_SWEEP), 1024), seed=99)
    for _ in range(3):
        encode_array(model, sweep_texts[:batch])  # warm-up
    sweep = direct_sweep(lambda chunk: encode_array(model, chunk), sweep_texts, EMBED_SWEEP,
                         cfg.embed_sweep_s)
    chosen = knee(sweep)
    log("  direct sweep, sentences/s: " + ", ".join(f"batch {k}: {v:,.0f}" for k, v in sweep.items()))
    log(f"  the sweep's knee (smallest batch within 90% of its best rate): {chosen}; the worker runs "
        f"max_batch_size={batch} (EXAMPLE_EMBED_BATCH_SIZE; {'CUDA' if cuda else 'CPU'} default "
        f"{128 if cuda else 32}{', --embed-batch' if cfg.embed_batch else ''})")

    def on_worker_batches() -> list[Any]:
        """The model called directly on the very batches the worker runs: the sentences in
        arrival order, one call per ``batch`` of them. (One ``encode`` call over all of them
        would sort the whole set by length first and pad less than any worker can: a different
        workload.)"""
        return [encode_array(model, texts[i:i + batch]) for i in range(0, len(texts), batch)]

    def direct_on_texts() -> float:
        """``on_worker_batches`` in sentences/s."""
        t = time.perf_counter()
        on_worker_batches()
        return len(texts) / (time.perf_counter() - t)

    reference = [row for chunk in on_worker_batches() for row in chunk.tolist()]  # warms the shapes

    def through_worker(task: Any, w: Worker, items: Sequence[str], bulk: bool = False
                       ) -> tuple[float, float | None, dict[str, float]]:
        """Sentences/s, first submit → last result stored; mean batch; CPU µs per item by process
        until the last result is stored. Every vector is checked."""
        before = batching_stats(app, w.hostname, task.name)
        cpu = ProcessCpu(w)
        t0 = time.time()
        if bulk:
            ids = [res.id for res in task.map_items(items, queue=QUEUE)]
        else:
            ids = [str(uuid.uuid4()) for _ in items]
            for tid, s in zip(ids, items):
                task.apply_async((s,), task_id=tid, queue=QUEUE)
        done = wait_for_results(r, ids, timeout=cfg.embed_timeout, worker=w, interval=0.05)
        cpu_us = cpu.per_item(len(ids))
        if done < len(ids):
            raise CorrectnessError(f"embed[{task.name}]: only {done} of {len(ids)} results after "
                                   f"{cfg.embed_timeout}s")
        metas = fetch_results(r, ids, decode=decoder(serializer))
        verify_results(f"embed[{task.name}]", metas, ids, reference[:len(ids)],
                       check=lambda a, b: isinstance(a, list) and len(a) == len(b) and _cosine(a, b) > 0.999)
        rate = len(ids) / (max(date_done_ts(m) for m in metas if m) - t0)
        r.delete(*result_keys(ids))
        return rate, mean_batch(batching_stats(app, w.hostname, task.name), before), cpu_us

    n_one = min(n, cfg.embed_one_items)  # one item per task: a subset (it's slow)
    with Worker("benchmarks.apps.bench_example", QUEUE, "embed", cfg.redis_url).start(timeout=300) as w:
        t = time.perf_counter()
        embed_one.apply_async(("warm up",), queue=QUEUE).get(timeout=300)
        for _ in range(2):  # full batches: the first calls at a new shape are slow
            for res in [embed.apply_async((s,), queue=QUEUE) for s in sweep_texts[:batch]]:
                res.get(timeout=300)
        log(f"  worker ready; model loaded in its pool process and warmed up in "
            f"{time.perf_counter() - t:.1f}s")
        # Rounds of the model called directly and through the worker, alternating: this VM's
        # speed drifts by 10-20% over a minute (other tenants, clocks), so each worker round is
        # compared with the direct runs right before and after it, and the median round counts.
        directs = [direct_on_texts()]
        rounds: list[tuple[float, float | None, dict[str, float]]] = []
        for k in range(cfg.embed_rounds if hasattr(embed, "map_items") else 0):
            rounds.append(through_worker(embed, w, texts, bulk=True))
            directs.append(direct_on_texts())
            rate, mb_k, cpu_k = rounds[-1]
            log(f"  round {k + 1}: batched task, {n:,} sent with map_items: {rate:,.0f} "
                f"sentences/s (mean batch {mb_k or float('nan'):.1f}), direct "
                f"{directs[-2]:,.0f}/s before and {directs[-1]:,.0f}/s after: "
                f"{200 * rate / (directs[-2] + directs[-1]):.0f}%; {CPU_LABEL}: {fmt_cpu(cpu_k)}")
        shares = [2 * rate / (directs[k] + directs[k + 1]) for k, (rate, _, _) in enumerate(rounds)]
        if rounds:
            middle = sorted(range(len(rounds)), key=shares.__getitem__)[len(rounds) // 2]
            batched, mb, cpu_us = rounds[middle]
            direct = (directs[middle] + directs[middle + 1]) / 2
        else:
            batched, mb, cpu_us, direct = float("nan"), None, None, statistics.fmean(directs)
        loop, mb_loop, _ = through_worker(embed, w, texts)
        log(f"  batched task, {n:,} sent with an apply_async loop: {loop:,.0f} sentences/s "
            f"(mean batch {mb_loop or float('nan'):.1f})")
        if math.isnan(batched):
            batched, mb = loop, mb_loop
            directs.append(direct_on_texts())
            direct = statistics.fmean(directs)
            shares = [batched / direct]
        per_item, _, _ = through_worker(embed_one, w, texts[:n_one])
        log(f"  embed_one per item through the worker: {per_item:,.0f} sentences/s ({n_one})")
    log(f"  the model called directly on the same {n:,} sentences, {n // batch} calls of {batch}: "
        f"{', '.join(f'{d:,.0f}' for d in directs)}/s (sweep: "
        f"{fmt_rate(sweep[batch]) if batch in sweep else 'n/a'}/s)")
    del model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    r.flushdb()
    r.close()
    rep.data["embed"] = {"device": device, "n": n, "n_one": n_one, "torch_threads": threads,
                         "batch": batch, "sweep": sweep, "knee": chosen, "serializer": serializer,
                         "directs": directs, "shares": shares, "direct": direct,
                         "batched": batched, "mean_batch": mb, "batched_loop_submit": loop,
                         "mean_batch_loop_submit": mb_loop, "per_item": per_item, "cpu_us": cpu_us}
    rep.add(f"Embed: the model called directly ({device}, {threads} torch CPU thread(s)), "
            f"sentences/s at batch " + " / ".join(str(k) for k in sweep),
            " / ".join(fmt_rate(v) for v in sweep.values()),
            ratio=f"knee at batch {chosen}; worker runs batch {batch}")
    rep.add(f"Embed {n:,} sentences through one worker (max_batch_size {batch}, {serializer} "
            f"results; mean batch {mb or float('nan'):.1f}), sentences/s, map_items (apply_async "
            f"loop) vs the model called directly on the same batches (the median of "
            f"{len(shares)} round(s), each against the direct runs before and after it)",
            f"{fmt_rate(batched)} ({fmt_rate(loop)})",
            ratio=(f"{100 * batched / direct:.0f}% of direct ({fmt_rate(direct)}/s; rounds "
                   f"{' / '.join(f'{100 * x:.0f}%' for x in shares)})"),
            target=f"≥ {100 * EMBED_TARGET:.0f}%",
            met=met(batched >= EMBED_TARGET * direct))
    if cpu_us:
        rep.add(f"Embed through the worker (map_items): {CPU_LABEL}", fmt_cpu(cpu_us))
    rep.add(f"Embed: batched `embed` vs `embed_one` per item ({n_one}) through the worker, sentences/s",
            fmt_rate(batched), fmt_rate(per_item),
            ratio=f"{fmt_ratio(batched, per_item)} vs per item", target="≥ 3×",
            met=met(batched >= 3 * per_item))


# ----------------------------------------------------------------------------------------------
# Section 6: worker RSS over a large drain
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
    embed_items: int | None
    cpu_embed_items: int
    gpu_embed_items: int
    embed_one_items: int
    embed_rounds: int
    embed_threads: int
    embed_timeout: float
    embed_batch: int | None
    embed_sweep_s: float
    gpusim_items: int
    gpusim_f_ms: float
    gpusim_p_ms: float
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
        rv = redis_client(os.environ.get("BENCH_BROKER_URL", DEFAULT_REDIS_URL)).info("server")["redis_version"]
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
