"""Section 5, ``embed``: the example project's all-MiniLM-L6-v2 through one worker against the model
called directly on the same batches, and batched against one item per task."""

from __future__ import annotations

import gc
import math
import os
import statistics
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from .common import CorrectnessError, log
from .config import Config
from .cpu import CPU_LABEL, ProcessCpu, fmt_cpu
from .report import Report, fmt_rate, fmt_ratio, met
from .results import (date_done_ts, decoder, fetch_results, redis_client, result_keys,
                      verify_results, wait_for_results)
from .sentences import make_sentences
from .workers import Worker, batching_stats, mean_batch

EMBED_SWEEP = (1, 8, 16, 32, 64, 128, 256)
EMBED_TARGET = 0.90  # through one worker vs the model called directly at the same batch size


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
