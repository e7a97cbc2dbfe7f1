#!/usr/bin/env python
"""Batching policies, measured side by side in one run (issue: "batching policies").

    python benchmarks/policies.py                  # both sections (about 3 minutes on 2 cores)
    python benchmarks/policies.py --only latency   # or: bucketing, priorities
    python benchmarks/policies.py --redis-url redis://127.0.0.1:6379/9   # another db (flushed)

* ``bucketing``: the example's ``embed`` (all-MiniLM-L6-v2, CPU, batch 32) over a mix of short and
  long sentences, through one worker: plain ``embed`` vs ``embed_bucketed`` (``batch_key`` =
  length bucket), items/s, plus the model called directly on the same chunks. Padding waste shows
  up as items/s: a batch is padded to its longest sentence.
* ``latency``: a simulated model (20 ms + 0.5 ms per item of wall time, the CPU free; batch 32)
  behind ``wait_ms=50`` and behind ``max_latency_ms=100``, at a low, medium and high arrival
  rate: p50/p99 latency (submit -> result stored) and mean batch size.

* ``priorities``: the simulated model (batch 64) with a bulk backlog (20,000 items, priority 9)
  and a trickle of urgent items (20/s, priority 0) on one process: ``urgent_priority`` against
  the same task without it; bulk items/s and the urgent items' p50/p99 latency.

Every result is checked (exit status 1 on a wrong or missing one). Redis db 13 (or
``--redis-url``) is flushed.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

# The harness (benchmarks/bench/, shared with run.py): workers, Redis helpers, sentences.
from benchmarks.bench.common import DEFAULT_REDIS_URL, CorrectnessError, log  # noqa: E402
from benchmarks.bench.report import percentile  # noqa: E402
from benchmarks.bench.results import (date_done_ts, fetch_results, redis_client,  # noqa: E402
                                      verify_results, wait_for_results)
from benchmarks.bench.sentences import make_sentences  # noqa: E402
from benchmarks.bench.workers import Worker, batching_stats, mean_batch  # noqa: E402

REDIS_URL = DEFAULT_REDIS_URL
RATES = (("low", 20), ("medium", 300), ("high", 700))


def mixed_sentences(n: int, long_share: float = 0.25, seed: int = 7) -> list[str]:
    """Short sentences (~10 words) with a share of long ones (8 sentences joined, ~80 words)."""
    rng = random.Random(seed)
    short = make_sentences(n, seed=seed)
    pool = make_sentences(8 * n, seed=seed + 1)
    return [" ".join(pool[8 * i:8 * i + 8]) if rng.random() < long_share else short[i]
            for i in range(n)]


def section_bucketing(n: int) -> list[str]:
    os.environ.update({"CELERY_BROKER_URL": REDIS_URL, "CELERY_RESULT_BACKEND": REDIS_URL,
                       "EXAMPLE_EMBED_BATCH_SIZE": "32", "EXAMPLE_RESULT_SERIALIZER": "msgpack"})
    import numpy as np

    from example_project.celery_app import QUEUE
    from example_project.model import encode_array, load_model
    from example_project.tasks import embed, embed_bucketed, length_bucket

    texts = mixed_sentences(n)
    per_bucket = ", ".join(f"bucket {b}: {c}" for b, c in
                           sorted(Counter(length_bucket(t) for t in texts).items()))
    n_long = sum(len(t) > 200 for t in texts)
    log(f"== bucketing: {n} sentences, {n_long} long; {per_bucket} ==")
    model = load_model()
    for _ in range(2):
        encode_array(model, texts[:32])
    reference = encode_array(model, texts)

    def direct(order: Sequence[int]) -> float:
        t = time.perf_counter()
        for i in range(0, len(order), 32):
            encode_array(model, [texts[j] for j in order[i:i + 32]])
        return len(order) / (time.perf_counter() - t)

    arrival = list(range(n))
    by_bucket = sorted(arrival, key=lambda i: length_bucket(texts[i]))  # what batch_key groups
    runs = [(direct(arrival), direct(by_bucket)) for _ in range(2)]  # interleaved, best of two
    direct_mixed, direct_bucketed = max(r[0] for r in runs), max(r[1] for r in runs)
    del model
    r = redis_client(REDIS_URL)
    r.flushdb()
    rows = []
    with Worker("benchmarks.apps.bench_example", QUEUE, "policies-embed", REDIS_URL).start() as w:
        embed.map_items(texts[:64], queue=QUEUE).get(timeout=300)  # setup(): load the model
        embed_bucketed.map_items(texts[:64], queue=QUEUE).get(timeout=300)
        for task in (embed, embed_bucketed, embed, embed_bucketed):  # interleaved: fair to both
            before = batching_stats(embed.app, w.hostname, task.name)
            t = time.perf_counter()
            got = task.map_items(texts, queue=QUEUE).get(timeout=600)
            rate = n / (time.perf_counter() - t)
            after = batching_stats(embed.app, w.hostname, task.name)
            cos = np.sum(np.asarray(got, dtype=np.float64) * reference, axis=1)
            if not (cos > 0.999).all():
                raise CorrectnessError(f"{task.name}: {int((cos <= 0.999).sum())} vectors "
                                           f"differ from the direct model's (cosine <= 0.999)")
            rows.append((task.name.rsplit(".", 1)[-1], rate, mean_batch(after, before)))
    r.close()
    rate_of = {name: max(x for n_, x, _ in rows if n_ == name) for name, _, _ in rows}
    batch_of = {name: b for name, _, b in rows}
    out = ["### Length buckets (`batch_key`), CPU `embed`, batch 32",
           f"{n} sentences in arrival order, {n_long} of them long (~80 words) among short ones "
           f"(~10 words; {per_bucket}); best of two runs each, every vector checked (cosine > "
           "0.999 against the model called directly).", "",
           "| | items/s | mean batch |", "|---|---|---|",
           f"| model called directly, chunks of 32 in arrival order | {direct_mixed:,.0f} | 32 |",
           f"| model called directly, chunks of 32 grouped by bucket | {direct_bucketed:,.0f} | 32 |",
           f"| worker, `embed` (no key) | {rate_of['embed']:,.0f} | {batch_of['embed']:.1f} |",
           f"| worker, `embed_bucketed` (`batch_key=length_bucket`) | "
           f"{rate_of['embed_bucketed']:,.0f} | {batch_of['embed_bucketed']:.1f} |",
           "", f"Bucketing: **{rate_of['embed_bucketed'] / rate_of['embed']:.2f}×** the items/s "
           f"of plain `embed` through the worker (the model alone: "
           f"{direct_bucketed / direct_mixed:.2f}×).", ""]
    return out


def paced_send(task: Any, rate: float, seconds: float, queue: str) -> tuple[list[str], list[float]]:
    ids, sent = [], []
    interval, n = 1.0 / rate, int(rate * seconds)
    start = time.perf_counter()
    with task.app.producer_or_acquire() as producer:
        for i in range(n):
            due = start + i * interval
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            tid = str(uuid.uuid4())
            sent.append(time.time())
            task.apply_async((i,), task_id=tid, queue=queue, producer=producer)
            ids.append(tid)
    return ids, sent


def section_latency(seconds: float) -> list[str]:
    from apps import bench_policies as sim

    queue = f"policies-{uuid.uuid4().hex[:6]}"
    r = redis_client(REDIS_URL)
    r.flushdb()
    exec_max = sim.FIXED_MS + sim.PER_ITEM_MS * sim.MAX_BATCH
    capacity = sim.MAX_BATCH / exec_max * 1000.0
    log(f"== latency: simulated model {sim.FIXED_MS:g} ms + {sim.PER_ITEM_MS:g} ms/item, "
            f"batch {sim.MAX_BATCH} (at most {capacity:,.0f} items/s) ==")
    results: dict[tuple[str, str], tuple[float, float, float, float]] = {}
    with Worker("benchmarks.apps.bench_policies", queue, "policies-latency",
                    REDIS_URL).start() as w:
        for task in (sim.fixed_wait, sim.latency_target):
            task.apply_async((0,), queue=queue).get(timeout=30)  # warm-up, and a first batch
        for label, rate in RATES:
            for task in (sim.fixed_wait, sim.latency_target):
                before = batching_stats(sim.app, w.hostname, task.name)
                ids, sent = paced_send(task, rate, seconds, queue)
                if wait_for_results(r, ids, timeout=120, worker=w, interval=0.05) < len(ids):
                    raise CorrectnessError(f"{task.name} at {rate}/s: results missing")
                metas = fetch_results(r, ids)
                verify_results(f"{task.name} at {rate}/s", metas, ids, list(range(len(ids))))
                lat = [(date_done_ts(m) - s) * 1000.0 for m, s in zip(metas, sent) if m]
                after = batching_stats(sim.app, w.hostname, task.name)
                results[(label, task.name)] = (
                    statistics.median(lat), percentile(lat, 99),
                    mean_batch(after, before) or 0.0, len(ids) / seconds)
                log(f"  {label:>6} {rate:>4}/s {task.name:<22} p50 "
                        f"{results[(label, task.name)][0]:6.1f} ms  p99 "
                        f"{results[(label, task.name)][1]:6.1f} ms  mean batch "
                        f"{results[(label, task.name)][2]:.1f}")
    r.close()
    out = [f"### Latency target vs fixed wait (simulated model {sim.FIXED_MS:g} ms + "
           f"{sim.PER_ITEM_MS:g} ms/item, batch {sim.MAX_BATCH})",
           f"`wait_ms={sim.WAIT_MS:g}` against `max_latency_ms={sim.TARGET_MS:g}` (about the "
           f"fixed wait's own worst case: {sim.WAIT_MS:g} ms + {exec_max:g} ms for a full batch), "
           f"{seconds:g} s at each rate; latency is submit → result stored (`date_done`).", "",
           "| rate | fixed `wait_ms` p50 / p99 (ms) | mean batch | `max_latency_ms` p50 / p99 "
           "(ms) | mean batch |", "|---|---|---|---|---|"]
    for label, rate in RATES:
        f = results[(label, sim.fixed_wait.name)]
        t = results[(label, sim.latency_target.name)]
        out.append(f"| {label} ({rate}/s) | {f[0]:.1f} / {f[1]:.1f} | {f[2]:.1f} | "
                   f"{t[0]:.1f} / {t[1]:.1f} | {t[2]:.1f} |")
    out.append("")
    return out


def urgent_trickle(task: Any, rate: float, queue: str, stop: threading.Event,
                   out: list[tuple[str, float, int]]) -> None:
    """Send one urgent item (priority 0) every 1/rate s until ``stop``: (id, sent at, value)."""
    interval, start, i = 1.0 / rate, time.perf_counter(), 0
    with task.app.producer_or_acquire() as producer:
        while not stop.is_set():
            delay = start + i * interval - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            tid, x = str(uuid.uuid4()), 1_000_000 + i
            out.append((tid, time.time(), x))
            task.apply_async((x,), task_id=tid, queue=queue, priority=0, producer=producer)
            i += 1


def section_priorities(backlog: int, rate: float) -> list[str]:
    from apps import bench_policies as sim

    r = redis_client(REDIS_URL)
    batch_ms = sim.FIXED_MS + sim.PER_ITEM_MS * sim.PRIO_BATCH
    bound = sim.URGENT_WAIT_MS + 2 * batch_ms
    log(f"== priorities: {backlog:,} bulk items (priority 9) + {rate:g} urgent items/s "
        f"(priority 0); simulated model {sim.FIXED_MS:g} ms + {sim.PER_ITEM_MS:g} ms/item, "
        f"batch {sim.PRIO_BATCH} ({batch_ms:g} ms) ==")
    rows: dict[str, tuple[float, float, float, float, int]] = {}
    for task in (sim.shared_plain, sim.shared_urgent):
        r.flushdb()
        queue = f"policies-prio-{uuid.uuid4().hex[:6]}"
        with Worker("benchmarks.apps.bench_policies", queue, "policies-prio", REDIS_URL).start():
            task.apply_async((0,), queue=queue, priority=9).get(timeout=30)  # warm-up
            xs = list(range(backlog))
            t0 = time.time()
            bulk = task.map_items(xs, queue=queue, priority=9)
            stop, trickle = threading.Event(), []
            sender = threading.Thread(target=urgent_trickle,
                                      args=(task, rate, queue, stop, trickle))
            sender.start()
            bulk_ids = [res.id for res in bulk]
            try:
                if wait_for_results(r, bulk_ids, timeout=600, interval=0.2) < backlog:
                    raise CorrectnessError(f"{task.name}: bulk results missing")
            finally:
                stop.set()
                sender.join()
            ids = [tid for tid, _, _ in trickle]
            if wait_for_results(r, ids, timeout=60, interval=0.05) < len(ids):
                raise CorrectnessError(f"{task.name}: urgent results missing")
            metas = fetch_results(r, bulk_ids)
            verify_results(f"{task.name} bulk", metas, bulk_ids, xs)
            drained = max(date_done_ts(m) for m in metas if m) - t0
            umetas = fetch_results(r, ids)
            verify_results(f"{task.name} urgent", umetas, ids, [x for _, _, x in trickle])
            lat = [(date_done_ts(m) - sent) * 1000.0
                   for m, (_, sent, _) in zip(umetas, trickle) if m]
            rows[task.name] = (backlog / drained, statistics.median(lat), percentile(lat, 99),
                               max(lat), len(lat))
            log(f"  {task.name:<20} bulk {rows[task.name][0]:7,.0f} items/s   urgent p50 "
                f"{rows[task.name][1]:6.1f} ms  p99 {rows[task.name][2]:6.1f} ms  max "
                f"{rows[task.name][3]:6.1f} ms  ({len(lat)} urgent items)")
    r.close()
    plain, urgent = rows[sim.shared_plain.name], rows[sim.shared_urgent.name]
    return [f"### Priorities: urgent trickle over a bulk backlog (simulated model "
            f"{sim.FIXED_MS:g} ms + {sim.PER_ITEM_MS:g} ms/item, batch {sim.PRIO_BATCH})",
            f"{backlog:,} bulk items (priority 9) sent at once, {rate:g} urgent items/s "
            f"(priority 0, Redis: the most urgent) while they drain, one pool process; latency "
            f"is submit → result stored. Target: urgent p99 ≤ `urgent_wait_ms` + two batches "
            f"= {bound:g} ms, bulk ≥ 90 % of the run without priorities.", "",
            "| | bulk items/s | urgent p50 / p99 / max (ms) | urgent items |",
            "|---|---|---|---|",
            f"| no priorities (`wait_ms={sim.PRIO_WAIT_MS:g}`) | {plain[0]:,.0f} | "
            f"{plain[1]:.1f} / {plain[2]:.1f} / {plain[3]:.1f} | {plain[4]} |",
            f"| `urgent_priority=0`, `urgent_wait_ms={sim.URGENT_WAIT_MS:g}` | {urgent[0]:,.0f} "
            f"({urgent[0] / plain[0]:.0%}) | {urgent[1]:.1f} / {urgent[2]:.1f} / "
            f"{urgent[3]:.1f} | {urgent[4]} |", ""]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default="bucketing,latency,priorities")
    parser.add_argument("--items", type=int, default=512, help="sentences for bucketing")
    parser.add_argument("--seconds", type=float, default=5.0, help="per rate, for latency")
    parser.add_argument("--backlog", type=int, default=20_000, help="bulk items, priorities")
    parser.add_argument("--urgent-rate", type=float, default=20.0, help="urgent items/s")
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL,
                        help="broker and backend (its db is flushed)")
    parser.add_argument("--out", type=Path, help="also write the tables (markdown) here")
    args = parser.parse_args(argv)
    global REDIS_URL
    REDIS_URL = args.redis_url
    os.environ.update({"BENCH_BROKER_URL": REDIS_URL, "BENCH_BACKEND_URL": REDIS_URL})
    only = set(args.only.split(","))
    lines: list[str] = []
    try:
        if "bucketing" in only:
            lines += section_bucketing(args.items)
        if "latency" in only:
            lines += section_latency(args.seconds)
        if "priorities" in only:
            lines += section_priorities(args.backlog, args.urgent_rate)
    except CorrectnessError as exc:
        print(f"CORRECTNESS FAILURE: {exc}", file=sys.stderr)
        return 1
    text = "\n".join(lines)
    print("\n" + text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
