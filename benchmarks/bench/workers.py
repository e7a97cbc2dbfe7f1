"""``Worker``: one ``celery worker`` subprocess (started, checked, stopped, killed), and its
``batching_stats`` (mean batch size, histogram)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from .common import LOG_DIR, ROOT, log
from .results import redis_client

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
