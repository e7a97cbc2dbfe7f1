"""Section 3, ``latency``: result ready − submit, heard through Redis pub/sub by a listener in its
own process; idle (interleaved single items) and under a paced load."""

from __future__ import annotations

import contextlib
import gc
import math
import multiprocessing as mp
import random
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from .common import log
from .config import Config
from .report import Report, fmt_ms, met, percentile
from .results import (RESULT_PREFIX, date_done_ts, fetch_results, redis_client, verify_results,
                      wait_for_results)
from .timed_drain import drain_once
from .workers import Worker, batching_stats, mean_batch


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
