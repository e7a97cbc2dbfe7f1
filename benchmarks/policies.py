#!/usr/bin/env python
"""Batching policies, measured side by side in one run (issue: "batching policies").

    python benchmarks/policies.py                  # both sections (about 3 minutes on 2 cores)
    python benchmarks/policies.py --only latency   # or: bucketing

* ``bucketing``: the example's ``embed`` (all-MiniLM-L6-v2, CPU, batch 32) over a mix of short and
  long sentences, through one worker: plain ``embed`` vs ``embed_bucketed`` (``batch_key`` =
  length bucket), items/s, plus the model called directly on the same chunks. Padding waste shows
  up as items/s: a batch is padded to its longest sentence.
* ``latency``: a simulated model (20 ms + 0.5 ms per item of wall time, the CPU free; batch 32)
  behind ``wait_ms=50`` and behind ``max_latency_ms=100``, at a low, medium and high arrival
  rate: p50/p99 latency (submit -> result stored) and mean batch size.

Every result is checked (exit status 1 on a wrong or missing one). Redis db 13 is flushed.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default="bucketing,latency")
    parser.add_argument("--items", type=int, default=512, help="sentences for bucketing")
    parser.add_argument("--seconds", type=float, default=5.0, help="per rate, for latency")
    parser.add_argument("--out", type=Path, help="also write the tables (markdown) here")
    args = parser.parse_args(argv)
    only = set(args.only.split(","))
    lines: list[str] = []
    try:
        if "bucketing" in only:
            lines += section_bucketing(args.items)
        if "latency" in only:
            lines += section_latency(args.seconds)
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
