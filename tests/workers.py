"""Real ``celery worker`` processes for tests: start, wait until ready, stop, kill -9."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def kill_group(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGKILL to a process started with ``start_new_session`` and its whole group."""
    if proc is None:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(10)


class Worker:
    """One ``celery -A <module> worker`` subprocess in its own process group."""

    def __init__(self, app_module: str, *, queues: str, pool: str = "prefork",
                 concurrency: int = 1, env: dict[str, str] | None = None,
                 extra_args: tuple[str, ...] = (), log_dir: Path) -> None:
        self.app_module = app_module
        self.hostname = f"w{uuid.uuid4().hex[:8]}@testhost"
        self.log_path = log_dir / f"{self.hostname.split('@')[0]}.log"
        self.cmd = [sys.executable, "-m", "celery", "-A", app_module, "worker",
                    "-Q", queues, "-P", pool, "-c", str(concurrency), "-n", self.hostname,
                    "--without-mingle", "--without-gossip", "--loglevel=INFO", *extra_args]
        self.env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                    "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> Worker:
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=self.env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.log()}")
            if b" ready." in self.log_path.read_bytes():
                return self
            time.sleep(0.1)
        raise RuntimeError(f"worker not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def child_pids(self) -> list[int]:
        import psutil
        try:
            return [p.pid for p in psutil.Process(self.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def stop(self, timeout: float = 30.0) -> int | None:
        """Warm shutdown (SIGTERM) and wait."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self) -> None:
        """kill -9 the worker and every process of its group (pool children too)."""
        kill_group(self.proc)

    def close(self) -> None:
        self.kill()
        self._log.close()


def wait_for(predicate: Any, timeout: float, interval: float = 0.05, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@contextlib.contextmanager
def captured_events(app: Any) -> Iterator[list[dict]]:
    """Every event on the broker while the block runs (subscribed before the block starts)."""
    seen: list[dict] = []
    holder: dict = {}

    def listen() -> None:
        with app.connection_for_read() as conn:
            recv = holder["recv"] = app.events.Receiver(conn, handlers={"*": seen.append})
            try:
                recv.capture(limit=None, timeout=30)
            except Exception:
                pass

    thread = threading.Thread(target=listen, daemon=True)
    thread.start()
    # The worker runs with -E: its heartbeat (every 2 s) proves the subscription is live.
    wait_for(lambda: seen, 10, what="a first event (worker heartbeat)")
    try:
        yield seen
    finally:
        holder["recv"].should_stop = True
        thread.join(5)


def exits_before_ready(start_worker: Any, app_module: str, queue: str,
                       env: dict[str, str]) -> tuple[int, str]:
    """Start a worker that must exit before it is ready: its exit status and its log."""
    with pytest.raises(RuntimeError, match="worker exited with") as err:
        start_worker(app_module, queues=queue, env=env)
    code = int(re.search(r"worker exited with (-?\d+)", str(err.value)).group(1))
    return code, str(err.value)
