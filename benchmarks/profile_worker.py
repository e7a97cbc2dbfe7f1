"""Where a worker spends its CPU per item (main process, or pool process): a drain under py-spy.

Pre-loads ``--items`` items of the simulated GPU model (``benchmarks/apps/bench_gpusim.py``: F ms
per call, 384 float32 per result, msgpack), starts one ``celery worker -P prefork -c 1``, samples
its main process (the consumer's thread and the result writer's; only the thread holding the GIL, so
waiting for it is not counted) with py-spy while it drains, and
prints the functions that held the CPU -- by own time and with their callees -- in µs per item,
next to the process's measured CPU per item. ``pip install py-spy`` first (not a dependency).

    python benchmarks/profile_worker.py --items 20000 --f-ms 10 [--process pool] [--task free] [--top 30]
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench.cpu import ProcessCpu  # noqa: E402
from benchmarks.bench.results import redis_client, wait_for_results  # noqa: E402
from benchmarks.bench.workers import Worker  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=int, default=20_000)
    p.add_argument("--f-ms", type=float, default=10.0)
    p.add_argument("--task", choices=("model", "free"), default="model")
    p.add_argument("--serializer", choices=("msgpack", "json"), default="msgpack")
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--process", choices=("consumer", "pool"), default="consumer",
                   help="the worker's main process, or its pool process")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/13")
    a = p.parse_args()
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not os.path.exists(py_spy):
        sys.exit("py-spy is not installed: pip install py-spy")
    os.environ.setdefault("BENCH_BROKER_URL", a.redis_url)
    from benchmarks.apps import bench_gpusim as g

    r = redis_client(a.redis_url)
    r.flushdb()
    app = g.make_app(a.serializer)
    name = g.MODEL_TASK if a.task == "model" else g.FREE_TASK
    queue = "bench.profile"
    ids = [res.id for res in app.tasks[name].map_items(range(a.items), queue=queue)]
    env = {"BENCH_RESULT_SERIALIZER": a.serializer, "BENCH_GPUSIM_F_MS": str(a.f_ms),
           "BENCH_GPUSIM_P_MS": "0", "BENCH_BROKER_URL": a.redis_url}
    out = Path(tempfile.mkdtemp()) / "consumer.txt"
    with Worker("benchmarks.apps.bench_gpusim", queue, "profile", a.redis_url, env=env) as worker:
        worker.start()
        assert worker.proc is not None
        procs = worker.processes()
        pid = procs[0].pid if a.process == "consumer" else procs[-1].pid
        spy = subprocess.Popen([py_spy, "record", "--pid", str(pid), "--format", "raw",
                                "--rate", str(a.rate), "--output", str(out), "--nonblocking", "--gil"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cpu = ProcessCpu(worker)
        t = time.perf_counter()
        done = wait_for_results(r, ids, timeout=600, worker=worker, interval=0.2)
        seconds = time.perf_counter() - t
        per_item = cpu.per_item(a.items)
        spy.send_signal(2)
        spy.wait(30)
    r.flushdb()
    report(out, a.items, done, seconds, per_item, a.rate, a.top, a.process)


def report(path: Path, n: int, done: int, seconds: float, per_item: dict[str, float],
           rate: int, top: int, process: str) -> None:
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        k = int(count)
        frames = [f for f in stack.split(";") if not f.startswith("process ")]
        if frames and frames[0].startswith("thread "):
            frames = frames[1:]
        if not frames:
            continue
        samples += k
        own[_short(frames[-1])] += k
        for f in {_short(f) for f in frames}:
            total[f] += k
    us = 1e6 / rate / n  # µs per item that one sample stands for
    print(f"{done:,} of {n:,} items in {seconds:.1f}s; measured CPU µs per item: consumer "
          f"{per_item['consumer']:.0f}, pool {per_item['pool']:.0f}, redis {per_item['redis']:.0f}")
    print(f"py-spy: {samples:,} samples holding the GIL = {samples * us:.0f} µs per item "
          f"({process} process, every thread)\n\nown time, µs per item:")
    for f, k in own.most_common(top):
        print(f"  {k * us:7.1f}  {f}")
    print("\nwith callees, µs per item:")
    for f, k in total.most_common(top):
        print(f"  {k * us:7.1f}  {f}")


def _short(frame: str) -> str:
    """``fn (path/to/module.py:123)`` -> ``fn (module.py)``."""
    fn, _, where = frame.partition(" (")
    file = where.rsplit(":", 1)[0].rstrip(")")
    parts = Path(file).parts
    return f"{fn} ({'/'.join(parts[-2:])})"


if __name__ == "__main__":
    main()
