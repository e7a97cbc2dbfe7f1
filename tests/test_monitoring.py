"""Seeing and steering batching on a real worker: batch fields on each item's events and in
Flower's event state, result_extended metas, Prometheus metrics, remote reconfiguration."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections import defaultdict

import pytest
from celery.events.state import State

from .apps import monitoring
from .workers import ROOT, captured_events, wait_for

APP = "tests.apps.monitoring"
BATCH_FIELDS = ("batch_id", "batch_size", "flush_reason", "buffer_wait_ms")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_item_events_carry_their_batch_and_flower_state_shows_it(redis_client, queue,
                                                                  start_worker):
    worker = start_worker(APP, queues=queue, extra_args=("-E",))
    keys = ["a", "b", "fail-c", "retry-d", "e", "f"]
    with captured_events(monitoring.app) as seen:
        results = {k: monitoring.scored.apply_async((k,), queue=queue) for k in keys}
        for k, r in results.items():
            if k.startswith("fail"):
                with pytest.raises(ValueError):
                    r.get(timeout=15)
            else:
                assert r.get(timeout=15) == f"done:{k}"
        wait_for(lambda: sum(e["type"] == "task-succeeded" for e in seen) >= 5, 10,
                 what="five task-succeeded events")
        time.sleep(0.3)
    ids = {r.id: k for k, r in results.items()}
    events = [e for e in seen if e.get("uuid") in ids]
    by_type: dict[str, list[dict]] = defaultdict(list)
    for e in events:
        by_type[e["type"]].append(e)
    # Every started/succeeded/failed/retried event names the item's batch.
    for kind in ("task-started", "task-succeeded", "task-failed", "task-retried"):
        assert by_type[kind], f"no {kind} event"
        for e in by_type[kind]:
            missing = [f for f in BATCH_FIELDS if e.get(f) is None]
            assert not missing, (kind, missing, e)
    # Failed and retried items carry their share of the batch's time too (Flower's runtime
    # metric counts any event's runtime), with the batch's whole time.
    for e in by_type["task-failed"] + by_type["task-retried"]:
        assert e["runtime"] == pytest.approx(e["batch_runtime_s"] / e["batch_size"], abs=1e-6), e
    # The first 4 items filled a batch (size flush); the rest ran in later ones.
    started: dict[str, dict] = {}  # each item's first start ("retry-d" starts again later)
    for e in sorted(by_type["task-started"], key=lambda e: e["clock"]):
        started.setdefault(ids[e["uuid"]], e)
    first = [started[k] for k in ("a", "b", "fail-c", "retry-d")]
    assert len({e["batch_id"] for e in first}) == 1
    assert {(e["batch_size"], e["flush_reason"]) for e in first} == {(4, "size")}
    tail = [started[k] for k in ("e", "f")]
    assert {e["flush_reason"] for e in tail} == {"wait_ms"}
    assert min(e["buffer_wait_ms"] for e in tail) >= 250  # they waited out wait_ms=300
    # task-succeeded: each item's runtime is its share; summed per batch, the batch's runtime.
    per_batch: dict[str, list[dict]] = defaultdict(list)
    for e in by_type["task-succeeded"]:
        per_batch[e["batch_id"]].append(e)
    for batch_events in per_batch.values():
        whole = batch_events[0]["batch_runtime_s"]
        size = batch_events[0]["batch_size"]
        assert all(e["runtime"] == pytest.approx(whole / size, abs=1e-6) for e in batch_events)
    # Celery's event state (what Flower and `celery events` build) keeps and lists the fields.
    state = State()
    for e in sorted(events, key=lambda e: e["clock"]):
        state.event(e)
    task = state.tasks[results["a"].id]
    assert task.batch_id == first[0]["batch_id"] and task.batch_size == 4
    as_dict = task.as_dict()
    assert as_dict["flush_reason"] == "size" and as_dict["batch_runtime_s"] > 0
    assert "batch_id" in task.info()
    assert worker.proc.poll() is None


def test_result_extended_metas_carry_the_batch(redis_client, queue, start_worker):
    start_worker(APP, queues=queue, env={"TEST_RESULT_EXTENDED": "1"})
    results = [monitoring.scored.apply_async((k,), queue=queue) for k in ("x", "y", "fail-z")]
    assert [r.get(timeout=15, propagate=False) is not None for r in results] == [True] * 3
    metas = [json.loads(redis_client.get(f"celery-task-meta-{r.id}")) for r in results]
    assert [m["status"] for m in metas] == ["SUCCESS", "SUCCESS", "FAILURE"]
    assert len({m["batch_id"] for m in metas}) == 1
    assert all(m["batch_size"] == 3 and m["flush_reason"] == "wait_ms" for m in metas), metas
    assert all(m["buffer_wait_ms"] >= 250 and m["name"] == monitoring.scored.name
               for m in metas), metas


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        m = re.match(r"^(celery_batched_\w+)(?:\{(.*)\})? (\S+)$", line)
        if m:
            labels = tuple(sorted(re.findall(r'(\w+)="([^"]*)"', m.group(2) or "")))
            out[(m.group(1), labels)] = float(m.group(3))
    return out


def test_prometheus_metrics_match_what_ran(redis_client, queue, start_worker):
    port = free_port()
    start_worker(APP, queues=queue, env={"TEST_METRICS_PORT": str(port)})
    task = monitoring.scored.name
    keys = [f"k{i}" for i in range(10)] + ["fail-1", "retry-1"]
    results = [monitoring.scored.apply_async((k,), queue=queue) for k in keys]
    for r in results:
        r.get(timeout=15, propagate=False)
    wait_for(lambda: scrape(port).get(("celery_batched_items_total",
                                       (("outcome", "succeeded"), ("task", task)))) == 11,
             10, what="11 succeeded items in the metrics")
    m = scrape(port)
    runs = [json.loads(x)["keys"] for x in redis_client.lrange("exec:scored", 0, -1)]
    t = (("task", task),)
    assert m[("celery_batched_batch_size_count", t)] == len(runs)
    assert m[("celery_batched_batch_size_sum", t)] == sum(len(r) for r in runs) == 13
    assert m[("celery_batched_buffer_wait_seconds_count", t)] == 13
    assert m[("celery_batched_batch_execution_seconds_count", t)] == len(runs)
    assert m[("celery_batched_batch_execution_seconds_sum", t)] >= 0.02 * len(runs)
    outcomes = {o: m.get(("celery_batched_items_total", (("outcome", o), ("task", task))), 0)
                for o in ("succeeded", "failed", "retried")}
    assert outcomes == {"succeeded": 11, "failed": 1, "retried": 1}
    reasons = {dict(labels)["reason"]: v for (name, labels), v in m.items()
               if name == "celery_batched_flushes_total"}
    assert sum(reasons.values()) == len(runs) and reasons.get("size", 0) >= 2, reasons
    assert m[("celery_batched_buffered_items", t)] == 0
    assert m[("celery_batched_batches_in_flight", t)] == 0


def test_configure_batching_changes_batch_sizes_on_a_running_worker(redis_client, queue,
                                                                   start_worker):
    worker = start_worker(APP, queues=queue)
    task = monitoring.resizable

    def burst(n: int) -> list[int]:
        redis_client.delete("exec:resizable")
        assert task.map_items(range(n), queue=queue).get(timeout=20) == list(range(n))
        return [int(x) for x in redis_client.lrange("exec:resizable", 0, -1)]

    assert burst(16) == [4, 4, 4, 4]
    reply = monitoring.app.control.broadcast(
        "configure_batching", arguments={"task_name": task.name,
                                         "settings": ["max_batch_size=8", "wait_ms=50"]},
        destination=[worker.hostname], reply=True, timeout=5)
    assert reply == [{worker.hostname: {"ok": {"max_batch_size": 8, "wait_ms": 50.0,
                                               "oom_errors": reply[0][worker.hostname]["ok"]
                                               ["oom_errors"]}}}], reply
    assert burst(16) == [8, 8]
    # Through Celery's CLI, as an operator would; a bad value is refused and changes nothing.
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}

    def cli(*args: str) -> str:
        out = subprocess.run([sys.executable, "-m", "celery", "-A", APP, *args,
                              "-d", worker.hostname, "-t", "3"],
                             cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
        return out.stdout + out.stderr

    refused = cli("control", "configure_batching", task.name, "max_batch_size=0")
    assert "max_batch_size must be >= 1" in refused, refused
    changed = cli("control", "configure_batching", task.name, "max_batch_size=2")
    assert "OK" in changed, changed
    assert burst(6) == [2, 2, 2]
    shown = cli("inspect", "batching_config", "--json")
    settings = json.loads(shown.strip().splitlines()[-1])[worker.hostname][task.name]
    assert settings["max_batch_size"] == 2 and settings["wait_ms"] == 50.0, settings
    sizes = dict(map(tuple, monitoring_stats(worker)[task.name]["batch_sizes"]))
    assert sizes == {2: 3, 4: 4, 8: 2}, sizes


def monitoring_stats(worker) -> dict:
    from celery_batched import batching_stats
    return batching_stats(monitoring.app, timeout=2.0, destination=[worker.hostname])[worker.hostname]


def test_flower_task_page_shows_the_batch(redis_client, queue, start_worker, tmp_path):
    """What a user sees: Flower's own task page (rendered HTML) lists the item's batch."""
    pytest.importorskip("flower")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    log = open(tmp_path / "flower.log", "wb")
    flower = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", APP, "flower", f"--port={port}",
         "--address=127.0.0.1"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)
    try:
        def page(path: str) -> str:
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{port}{path}",
                                              timeout=5).read().decode()
            except OSError:
                return ""

        wait_for(lambda: page("/healthcheck") == "OK", 30, what="Flower to answer")
        worker = start_worker(APP, queues=queue, extra_args=("-E",))
        results = [monitoring.scored.apply_async((k,), queue=queue) for k in "wxyz"]
        assert [r.get(timeout=15) for r in results] == [f"done:{k}" for k in "wxyz"]
        html = wait_for(lambda: (lambda h: h if "Batch runtime s" in h else "")(
            page(f"/task/{results[0].id}")), 15, what="the task page with the batch fields")
        rows = dict(re.findall(r"<dt>([^<]+)</dt>\s*<dd>\s*([^<]*?)\s*</dd>", html))
        assert rows["Batch size"] == "4" and rows["Flush reason"] == "size", rows
        assert re.fullmatch(rf"{re.escape(worker.hostname)}:[0-9a-f]{{6}}-\d+", rows["Batch id"]), rows
        assert float(rows["Buffer wait ms"]) >= 0 and float(rows["Batch runtime s"]) > 0, rows
        # An innocent item of a batch whose function raised: its page names the batch, the
        # batch's runtime, and (in the traceback) that the error may be a neighbour's.
        failed = [monitoring.strict.apply_async((x,), queue=queue) for x in ("ok", 3)]
        for r in failed:
            r.get(timeout=15, propagate=False)
        html = wait_for(lambda: (lambda h: h if "Batch runtime s" in h else "")(
            page(f"/task/{failed[0].id}")), 15, what="the failed item's page with its batch")
        rows = dict(re.findall(r"<dt>([^<]+)</dt>\s*<dd>\s*([^<]*?)\s*</dd>", html))
        assert rows["Batch size"] == "2" and float(rows["Batch runtime s"]) > 0, rows
        assert f"raised this for the whole batch {rows['Batch id']} (2 items)" in html
    finally:
        flower.terminate()
        try:
            flower.wait(10)
        except subprocess.TimeoutExpired:
            flower.kill()
        log.close()


def test_batch_observers_see_every_batch(redis_client, queue, start_worker):
    """``batching_observers``: a user's observer is told every batch's flush, execution and
    end, with the items and outcomes that really ran; one that raises is logged and changes
    nothing."""
    from .apps import observed

    worker = start_worker("tests.apps.observed", queues=queue)
    results = [observed.halve.apply_async((x,), queue=queue) for x in range(40)]
    for x, r in enumerate(results):
        if x % 2:
            with pytest.raises(ValueError):
                r.get(timeout=15)
        else:
            assert r.get(timeout=15) == x // 2
    wait_for(lambda: redis_client.llen("obs:finished") >= redis_client.llen("obs:flushed") > 0,
             10, what="every flushed batch finished")
    flushed = [b.decode().split("|") for b in redis_client.lrange("obs:flushed", 0, -1)]
    executed = [b.decode().split("|") for b in redis_client.lrange("obs:executed", 0, -1)]
    finished = [b.decode().split("|") for b in redis_client.lrange("obs:finished", 0, -1)]
    ids = [f[0] for f in flushed]
    assert len(set(ids)) == len(ids) and [e[0] for e in executed] == ids
    assert sorted(f[0] for f in finished) == sorted(ids)
    assert all(e[1] == "True" for e in executed)
    item_ids = [i for f in flushed for i in f[3].split(",")]
    assert sorted(item_ids) == sorted(r.id for r in results), "an item was missed or seen twice"
    assert sum(int(f[1]) for f in flushed) == 40
    assert {f[2] for f in flushed} <= {"size", "wait_ms"}
    counts = [list(map(int, f[1:])) for f in finished]
    assert sum(c[0] for c in counts) == 20 and sum(c[1] for c in counts) == 20
    assert sum(c[2] + c[3] for c in counts) == 0
    assert "batch observer" in worker.log() and "an observer's bug" in worker.log()
