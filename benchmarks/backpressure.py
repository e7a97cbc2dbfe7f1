"""What ``max_backlog`` costs a producer: µs per ``delay()`` with and without the bound, side by
side in one run, on the local Redis (db 13, flushed), no worker (the queue only grows).

    python benchmarks/backpressure.py [--items 5000] [--rounds 3]

The bound reads the queue's length at most every ``REFRESH_S`` (one pipelined round trip);
every send in between only compares numbers. The table prints the median of the rounds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from celery import Celery  # noqa: E402

from celery_batched import BatchedTask  # noqa: E402
from celery_batched.client import backlog  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=int, default=5000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/13")
    a = p.parse_args()
    app = Celery("bench_bp", broker=a.redis_url, backend=a.redis_url)
    app.conf.update(task_serializer="json", accept_content=["json"])

    @app.task(base=BatchedTask, name="bench.bp", max_batch_size=64, wait_ms=10, shared=False)
    def double(xs: list[int]) -> list[int]:
        return [2 * x for x in xs]

    import redis

    r = redis.Redis.from_url(a.redis_url)
    runs: dict[str, list[float]] = {"no bound": [], "max_backlog": []}
    reads: list[int] = []
    for _ in range(a.rounds):
        for label, limit in (("no bound", None), ("max_backlog", 10 * a.items)):
            r.flushdb()
            queue = f"bench.bp.{uuid.uuid4().hex[:6]}"
            double.apply_async((0,), queue=queue, max_backlog=limit)  # connections warm
            r.config_resetstat()
            t = time.perf_counter()
            for i in range(a.items):
                double.apply_async((i,), queue=queue, max_backlog=limit)
            runs[label].append((time.perf_counter() - t) / a.items * 1e6)
            if limit is not None:
                reads.append(r.info("commandstats").get("cmdstat_llen", {}).get("calls", 0))
    r.flushdb()
    base, bound = (statistics.median(runs[k]) for k in ("no bound", "max_backlog"))
    print(f"{a.items:,} delay() calls per round, {a.rounds} rounds (median), Redis broker")
    print("| producer | µs per delay() | ratio |\n|---|---|---|")
    print(f"| no bound | {base:.1f} | 1.00 |")
    print(f"| max_backlog (read every {backlog.REFRESH_S:g} s) | {bound:.1f} | {bound / base:.2f} |")
    print(f"LLEN commands per round with the bound: {', '.join(map(str, reads))} "
          f"(one pipeline of one LLEN per priority step per read)")


if __name__ == "__main__":
    main()
