"""Operating a batching worker as an operator would (issue 19): from one failed item to its
batch and neighbours, metrics turned on from the command line or the environment, what the
scrape and ``configure_batching`` answer, the log lines."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from celery_batched import batching_stats

from .apps import monitoring
from .test_monitoring import scrape
from .workers import ROOT, exits_before_ready, wait_for

APP = "tests.apps.monitoring"
ENV = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def celery_cli(worker, *args: str) -> str:
    """``celery -A tests.apps.monitoring <args> -d <worker> -t 5``: what an operator types."""
    out = subprocess.run([sys.executable, "-m", "celery", "-A", APP, *args,
                          "-d", worker.hostname, "-t", "5"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60, env=ENV)
    return out.stdout + out.stderr


def inspect_json(worker, *args: str) -> dict:
    shown = celery_cli(worker, "inspect", *args, "--json")
    return json.loads(shown.strip().splitlines()[-1])[worker.hostname]


def metrics_port(worker) -> int:
    line = wait_for(lambda: re.search(r"Prometheus metrics at http://127\.0\.0\.1:(\d+)/metrics",
                                      worker.log()), 10, what="the metrics start-up line")
    return int(line.group(1))


def test_a_failed_item_leads_to_its_batch_and_its_neighbours(redis_client, queue, start_worker):
    worker = start_worker(APP, queues=queue)
    inputs = ["a", "b", 3, "d"]  # one bad item: the function raises for the whole batch
    results = [monitoring.strict.apply_async((x,), queue=queue) for x in inputs]
    for r in results:
        with pytest.raises(ValueError, match="Unsupported input type: int"):
            r.get(timeout=15)
    ids = [r.id for r in results]
    # The innocent item's stored error says whose batch raised, and how to find the culprit.
    innocent = results[0].traceback
    note = re.search(r"celery_batched: tests\.apps\.monitoring\.strict raised this for the whole "
                     r"batch (\S+) \(4 items\), not for this item alone: another item may have "
                     r"caused it\. isolate_failures=True", innocent)
    assert note, innocent
    batch_id = note.group(1)
    assert batch_id.startswith(f"{worker.hostname}:"), batch_id  # unique across a fleet
    # The ERROR line names the batch and its items; the INFO line counts each outcome apart.
    done = rf"Batch {re.escape(batch_id)} of 4 \S+ \(size\) done in [\d.]+ m?s .*: "
    # (the results are stored in the pool; the worker logs the line once the reply is in)
    wait_for(lambda: re.search(done + "0 succeeded, 4 failed, 0 retried, 0 handed back",
                               worker.log()), 10, what="the batch's INFO line")
    error = next(line for line in worker.log().splitlines()
                 if "ERROR" in line and f"batch {batch_id} of 4" in line)
    assert all(i in error for i in ids) and "4 item(s) failed" in error, error
    # `celery inspect batch <id>`: every item of the batch and what became of it.
    shown = inspect_json(worker, "batch", batch_id)
    assert [(i["id"], i["outcome"]) for i in shown["items"]] == [(i, "failed") for i in ids]
    assert shown["function_raised"] is True and shown["flush_reason"] == "size", shown
    assert shown["counts"] == {"succeeded": 0, "failed": 4, "retried": 0, "handed_back": 0}
    # ... found from any one of its items' ids too.
    assert inspect_json(worker, "batch", ids[2])["batch_id"] == batch_id
    unknown = celery_cli(worker, "inspect", "batch", "nope:000000-1")
    assert "is not among this worker's last 2048 batches" in unknown, unknown
    # With isolate_failures the bad item fails alone, with no note blaming the batch.
    isolated = [monitoring.strict_isolated.apply_async((x,), queue=queue) for x in inputs]
    assert [r.get(timeout=15, propagate=False) for r in isolated][::3] == ["A", "D"]
    assert isolated[2].state == "FAILURE" and "celery_batched:" not in isolated[2].traceback
    stats = batching_stats(monitoring.app, timeout=5, destination=[worker.hostname])
    mine = stats[worker.hostname]
    assert {k: mine[monitoring.strict.name][k] for k in ("succeeded", "failed", "batches_raised")} \
        == {"succeeded": 0, "failed": 4, "batches_raised": 1}
    assert mine[monitoring.strict_isolated.name]["succeeded"] == 3
    assert mine[monitoring.strict_isolated.name]["failed"] == 1


def test_metrics_from_the_command_line_show_backlog_settings_setup_and_raised_batches(
        redis_client, queue, start_worker):
    worker = start_worker(APP, queues=queue, extra_args=("--batching-metrics-port=0",))
    port = metrics_port(worker)  # 0: any free port, logged
    gated = monitoring.gated
    results = [gated.apply_async((i,), queue=queue) for i in range(120)]
    task = (("task", gated.name),)

    def backlog_settled():
        m = scrape(port)
        waiting = m.get(("celery_batched_queue_messages", (("queue", queue),)))
        held = m.get(("celery_batched_held_items", task))
        return m if held and waiting and waiting == redis_client.llen(queue) else None

    # The first batch blocks on the gate: the rest waits in the worker (held) and in Redis.
    m = wait_for(backlog_settled, 20, what="the scrape's backlog to match the Redis list")
    assert 0 < m[("celery_batched_held_items", task)] < 120
    assert m[("celery_batched_queue_messages", (("queue", queue),))] + \
        m[("celery_batched_held_items", task)] == 120
    assert m[("celery_batched_max_batch_size", task)] == 4
    assert m[("celery_batched_wait_seconds", task)] == pytest.approx(0.05)
    assert "OK" in celery_cli(worker, "control", "configure_batching", gated.name,
                              "max_batch_size=8")
    assert scrape(port)[("celery_batched_max_batch_size", task)] == 8
    redis_client.set("gate", "1")
    assert [r.get(timeout=30) for r in results] == list(range(120))
    # setup() is measured apart from the batch's execution.
    assert [monitoring.loaded.apply_async((i,), queue=queue).get(timeout=15)
            for i in range(2)] == [0, 1]
    # A batch whose function raised is counted as such.
    for r in [monitoring.strict.apply_async((x,), queue=queue) for x in ("x", 1)]:
        r.get(timeout=15, propagate=False)
    m = wait_for(lambda: (lambda m: m if m.get(("celery_batched_items_total", (
        ("outcome", "failed"), ("task", monitoring.strict.name)))) == 2 else None)(scrape(port)),
        10, what="the strict batch in the metrics")
    loaded = (("task", monitoring.loaded.name),)
    assert m[("celery_batched_setup_seconds_count", loaded)] == 1
    assert m[("celery_batched_setup_seconds_sum", loaded)] >= 0.6
    assert m[("celery_batched_batch_execution_seconds_sum", loaded)] < \
        m[("celery_batched_setup_seconds_sum", loaded)]
    assert m[("celery_batched_raised_batches_total", (("task", monitoring.strict.name),))] == 1
    assert ("celery_batched_raised_batches_total", task) not in m
    reasons = {dict(labels)["reason"] for (name, labels) in m
               if name == "celery_batched_flushes_total"}
    assert reasons and all(re.fullmatch(r"[a-z_]+", r) for r in reasons), reasons
    # The Monitoring page's metrics table names every metric a scrape shows.
    page = (Path(ROOT) / "docs" / "monitoring.md").read_text()
    families = {re.sub(r"_(bucket|sum|count|total|created)$", "", name) for name, _ in m}
    missing = sorted(f for f in families if f"`{f}" not in page)
    assert not missing, f"docs/monitoring.md lacks {missing}"
    # The Grafana dashboard queries only metrics a worker serves, each per worker.
    dashboard = json.loads((Path(ROOT) / "example_project" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    queried = {re.sub(r"_(bucket|sum|count|total)$", "", n)
               for e in exprs for n in re.findall(r"celery_batched_\w+", e)}
    assert queried <= families, queried - families
    assert all('instance=~"$instance"' in e for e in exprs), exprs
    assert {v["name"] for v in dashboard["templating"]["list"]} >= {"instance", "task"}


def test_metrics_port_from_the_environment_and_a_bad_one_refused(redis_client, queue,
                                                                 start_worker):
    from .test_monitoring import free_port

    port = free_port()
    worker = start_worker(APP, queues=queue, env={"CELERY_BATCHED_METRICS_PORT": str(port)})
    assert metrics_port(worker) == port
    assert monitoring.resizable.apply_async((5,), queue=queue).get(timeout=15) == 5
    assert scrape(port)[("celery_batched_max_batch_size",
                         (("task", monitoring.resizable.name),))] == 4
    code, log = exits_before_ready(start_worker, APP, queue,
                                   env={"CELERY_BATCHED_METRICS_PORT": "http"})
    assert code != 0 and "batching metrics port 'http' is not a port number" in log, log


def test_configure_batching_answers_mistakes_plainly(redis_client, queue, start_worker):
    worker = start_worker(APP, queues=queue)
    name = monitoring.resizable.name
    fractional = celery_cli(worker, "control", "configure_batching", name, "max_batch_size=8.5")
    assert "ERROR" in fractional and "max_batch_size must be an int, got 8.5" in fractional, \
        fractional
    typo = celery_cli(worker, "control", "configure_batching", name[:-1], "max_batch_size=8")
    assert f"did you mean {name}?" in typo, typo
    huge = monitoring.app.control.broadcast(
        "configure_batching", arguments={"task_name": name,
                                         "settings": {"max_batch_size": 1000000}},
        destination=[worker.hostname], reply=True, timeout=5)[0][worker.hostname]["ok"]
    assert huge["max_batch_size"] == 1000000
    assert "prefetch count stops at 65535: batches will not fill" in huge["warnings"][0], huge
    assert "Traceback" not in worker.log(), worker.log()
