"""Section 4, ``bulk``: bulk submit (``starmap_items``) against an ``apply_async`` loop, and reading
many stored results back (``ItemResults.get()``)."""

from __future__ import annotations

import base64
import gc
import json
import time
from collections.abc import Sequence
from typing import Any

from .common import CorrectnessError, log
from .config import Config
from .cpu import CPU_LABEL, ProcessCpu, fmt_cpu
from .report import Report, fmt_rate, fmt_ratio, met
from .results import redis_client, wait_for_results
from .workers import Worker

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
