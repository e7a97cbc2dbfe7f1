"""CPU meters: by process per item over a measured window (``ProcessCpu``), and how much CPU
other programs on the machine used during a section (``CpuMeter``)."""

from __future__ import annotations

import math
import os
import time
from typing import TYPE_CHECKING, Any

from .common import DEFAULT_REDIS_URL

if TYPE_CHECKING:
    from .workers import Worker


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
