"""Documented behaviours, checked through real worker processes and a real Redis.

Definition-time errors, a failing ``setup()``, ``wait_ms=0``, ``RetryItem`` past its retries,
``acks_late=False``, ``batching_stats``, per-item events, one traceback per failing batch,
``rate_limit`` refusal, refusing to start when misconfigured, the garbage collector during bulk
submit, and acks on the consumer's thread.
"""

from __future__ import annotations

import gc
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest
from celery import Celery, states
from celery.exceptions import MaxRetriesExceededError, TaskRevokedError

from celery_batched import (
    BatchedTask,
    BatchedTaskDefinitionError,
    BatchedTaskOptionError,
    BatchSetupError,
    ItemArgumentsError,
    batching_stats,
)

from .apps import behaviour
from .workers import ROOT, captured_events, exits_before_ready, wait_for

APP = "tests.apps.behaviour"


def execs(redis_client, name: str) -> list[dict]:
    return [json.loads(x) for x in redis_client.lrange(f"exec:{name}", 0, -1)]


def unacked_ids(redis_client) -> set[str]:
    """Task ids of the messages kombu's Redis transport holds as unacknowledged (broker db)."""
    return {json.loads(raw)[0]["headers"]["id"] for raw in redis_client.hvals("unacked")}


# ------------------------------------------------------------------------------------------------
# 1. Definition-time errors
# ------------------------------------------------------------------------------------------------

def _one(xs):  # noqa: ANN001, ANN202
    return xs


def _star_args(xs, *rest):  # noqa: ANN001, ANN002, ANN202
    return xs


def _star_kwargs(xs, **extra):  # noqa: ANN001, ANN003, ANN202
    return xs


def _no_params():  # noqa: ANN202
    return []


# case: (options, function, expected error class, what the message must say besides the name)
DEFINITION_CASES = {
    "max_batch_size=0": ({"max_batch_size": 0}, _one, BatchedTaskOptionError,
                         ["max_batch_size", ">= 1"]),
    "max_batch_size='64'": ({"max_batch_size": "64"}, _one, BatchedTaskDefinitionError,
                            ["max_batch_size", "int"]),
    "wait_ms=-1": ({"wait_ms": -1}, _one, BatchedTaskOptionError, ["wait_ms", ">= 0"]),
    "wait_ms=inf": ({"wait_ms": float("inf")}, _one, BatchedTaskOptionError,
                    ["wait_ms", "finite"]),
    "*args": ({}, _star_args, BatchedTaskDefinitionError, ["*rest", "named parameters"]),
    "**kwargs": ({}, _star_kwargs, BatchedTaskDefinitionError, ["**extra", "named parameters"]),
    "no parameters": ({}, _no_params, BatchedTaskDefinitionError, ["at least one parameter"]),
}


@pytest.mark.parametrize("how", ["finalized app", "lazy app", "class"])
@pytest.mark.parametrize("case", list(DEFINITION_CASES))
def test_definition_errors_name_the_task_and_the_fix(case, how):
    options, fun, expected, says = DEFINITION_CASES[case]
    name = "throwaway." + re.sub(r"\W+", "_", case).strip("_")
    # shared=False: a shared task would be re-created (and raise) in every app finalized later.
    app = Celery("throwaway", set_as_current=False)
    if how == "finalized app":  # the decorator itself raises
        app.finalize()
        with pytest.raises(expected) as err:
            app.task(base=BatchedTask, name=name, shared=False, **options)(fun)
    elif how == "lazy app":  # docs (known limits): a lazy task reports it when the app finalizes (first use)
        app.task(base=BatchedTask, name=name, shared=False, **options)(fun)
        with pytest.raises(expected) as err:
            app.tasks  # noqa: B018  (first use finalizes the app)
    else:  # class-based: the class statement raises
        with pytest.raises(expected) as err:
            type("Bad", (BatchedTask,), {"name": name, "run": staticmethod(fun), **options})
    assert isinstance(err.value, (TypeError, ValueError))
    message = str(err.value)
    assert name in message
    for text in says:
        assert text in message


# ------------------------------------------------------------------------------------------------
# 2. setup() failing once
# ------------------------------------------------------------------------------------------------

def test_failed_setup_fails_its_batch_and_runs_again(redis_client, queue, start_worker):
    start_worker(APP, queues=queue, pool="prefork", concurrency=1)
    first = [behaviour.flaky_setup.apply_async((i,), queue=queue) for i in range(3)]
    for r in first:
        with pytest.raises(BatchSetupError) as err:
            r.get(timeout=10)
        assert "behaviour.flaky_setup" in str(err.value)
        assert "RuntimeError: GPU not ready yet" in str(err.value)
        assert r.state == states.FAILURE
    second = [behaviour.flaky_setup.apply_async((i,), queue=queue) for i in range(3, 6)]
    assert [r.get(timeout=10) for r in second] == [1003, 1004, 1005]
    pids = [int(p) for p in redis_client.lrange("setup-pids", 0, -1)]
    assert len(pids) == 2 and pids[0] == pids[1], f"setup() calls by process: {pids}"
    # The failed batch never reached the function.
    assert [r["xs"] for r in execs(redis_client, "flaky_setup")] == [[3, 4, 5]]


# ------------------------------------------------------------------------------------------------
# 3. wait_ms=0
# ------------------------------------------------------------------------------------------------

def test_wait_ms_zero_runs_lone_items_at_once_and_still_batches_bursts(redis_client, queue,
                                                                        start_worker):
    start_worker(APP, queues=queue)
    sent_at = {}
    lone = []
    for i in range(5):
        sent_at[i] = time.monotonic()
        lone.append(behaviour.zero_wait.apply_async((i,), queue=queue))
        time.sleep(0.2)
    assert [r.get(timeout=10) for r in lone] == [0, 2, 4, 6, 8]
    runs = execs(redis_client, "zero_wait")
    assert [r["xs"] for r in runs] == [[0], [1], [2], [3], [4]]
    for run in runs:
        assert run["t"] - sent_at[run["xs"][0]] < 1.0, f"item {run['xs']} ran late"

    burst = behaviour.zero_wait.map_items(range(100, 400), queue=queue)
    assert burst.get(timeout=30) == [x * 2 for x in range(100, 400)]
    sizes = [len(r["xs"]) for r in execs(redis_client, "zero_wait")[5:]]
    assert sum(sizes) == 300
    assert max(sizes) > 1, f"a burst with wait_ms=0 was not batched: {sizes}"
    assert max(sizes) <= 100


# ------------------------------------------------------------------------------------------------
# 4. RetryItem past max_retries
# ------------------------------------------------------------------------------------------------

def test_retry_item_out_of_retries_fails_after_three_runs(redis_client, queue, start_worker):
    start_worker(APP, queues=queue)
    keys = ["retry:a", "retry-exc:b", "ok:c", "ok:d"]
    results = {k: behaviour.always_retry.apply_async((k,), queue=queue) for k in keys}
    assert results["ok:c"].get(timeout=15) == "ok:ok:c"
    assert results["ok:d"].get(timeout=15) == "ok:ok:d"
    with pytest.raises(MaxRetriesExceededError):
        results["retry:a"].get(timeout=15)
    with pytest.raises(LookupError, match="still no answer for retry-exc:b"):
        results["retry-exc:b"].get(timeout=15)
    for key in ["retry:a", "retry-exc:b"]:
        assert results[key].state == states.FAILURE
        assert int(redis_client.get(f"tries:{key}")) == 3, key  # 1 run + max_retries=2
    assert int(redis_client.get("tries:ok:c")) == int(redis_client.get("tries:ok:d")) == 1
    # They started out as neighbours in one batch.
    assert set(execs(redis_client, "always_retry")[0]["keys"]) == set(keys)


# ------------------------------------------------------------------------------------------------
# 5. acks_late=False
# ------------------------------------------------------------------------------------------------

def test_acks_late_false_acks_when_the_batch_starts(redis_client, queue, start_worker):
    start_worker(APP, queues=queue, pool="prefork", concurrency=1)

    early = [behaviour.early_ack.apply_async((i,), queue=queue) for i in range(4)]
    ids = {r.id for r in early}
    wait_for(lambda: redis_client.get("running:early_ack"), 10, what="early_ack running")
    wait_for(lambda: not ids & unacked_ids(redis_client), 1.5,
             what="acks_late=False messages acknowledged while their batch runs")
    assert redis_client.get("finished:early_ack") is None, "the batch was over already"
    assert [r.get(timeout=10) for r in early] == [1, 2, 3, 4]

    late = [behaviour.late_ack.apply_async((i,), queue=queue) for i in range(4)]
    ids = {r.id for r in late}
    wait_for(lambda: redis_client.get("running:late_ack"), 10, what="late_ack running")
    assert ids <= unacked_ids(redis_client)
    time.sleep(0.5)
    assert ids <= unacked_ids(redis_client), "acks_late=True messages acked while running"
    assert redis_client.get("finished:late_ack") is None
    assert [r.get(timeout=10) for r in late] == [1, 2, 3, 4]
    wait_for(lambda: not ids & unacked_ids(redis_client), 5, what="acks after the results")


# ------------------------------------------------------------------------------------------------
# 6. batching_stats
# ------------------------------------------------------------------------------------------------

def test_batching_stats_api_and_cli(redis_client, queue, start_worker):
    worker = start_worker(APP, queues=queue)
    name = behaviour.counted.name
    burst = behaviour.counted.map_items(range(8), queue=queue)  # two size flushes of 4
    assert burst.get(timeout=10) == [-x for x in range(8)]
    tail = [behaviour.counted.apply_async((i,), queue=queue) for i in range(3)]  # one wait flush
    assert [r.get(timeout=10) for r in tail] == [0, -1, -2]
    recorded = Counter(str(r["n"]) for r in execs(redis_client, "counted"))
    assert recorded == {"4": 2, "3": 1}

    def stats() -> dict:
        return batching_stats(behaviour.app, timeout=2.0,
                              destination=[worker.hostname]).get(worker.hostname, {}).get(name, {})

    expected = {"batches": 3, "items": 11, "batch_sizes": [[3, 1], [4, 2]],
                "flush_reasons": {"size": 2, "wait_ms": 1}, "buffered": 0, "held": 0}
    assert sorted(recorded.items()) == [("3", 1), ("4", 2)]
    wait_for(lambda: stats().get("batches") == 3, 10, what="3 batches in batching_stats")
    time.sleep(0.3)  # idle: the last batch's acks are done
    got = stats()
    recent = got.pop("recent")
    assert {k: got[k] for k in expected} == expected
    assert got["settings"] == {"max_batch_size": 4, "wait_ms": behaviour.counted.wait_ms,
                               "oom_errors": got["settings"]["oom_errors"]}
    assert recent["batches"] == 3
    assert recent["batch_size"] == {"p50": 4.0, "p99": 4.0, "max": 4.0}
    assert 0 < recent["execution_ms"]["p50"] <= recent["execution_ms"]["max"]
    # The last batch's 3 items waited wait_ms; the full batches' items hardly at all.
    assert recent["buffer_wait_ms"]["max"] >= behaviour.counted.wait_ms * 0.9
    expected = {**got, "recent": recent}

    out = subprocess.run(
        [sys.executable, "-m", "celery", "-A", APP, "inspect", "batching_stats",
         "-d", worker.hostname, "--json", "-t", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    assert out.returncode == 0, out.stderr
    replies = json.loads(out.stdout.strip().splitlines()[-1])
    assert replies[worker.hostname][name] == expected


# ------------------------------------------------------------------------------------------------
# 7. Per-item events
# ------------------------------------------------------------------------------------------------

def test_events_per_item_outcome(redis_client, queue, start_worker):
    worker = start_worker(APP, queues=queue, extra_args=("-E",))
    task = behaviour.evented
    with captured_events(behaviour.app) as seen:
        results = {k: task.apply_async((k,), queue=queue)
                   for k in ["ok", "fail", "retry", "revoke", "vec"]}
        # wait_ms is 2 s: the revoke arrives while "revoke" is still buffered.
        replies = behaviour.app.control.revoke(results["revoke"].id, reply=True,
                                               destination=[worker.hostname])
        assert replies, "the worker didn't answer the revoke"
        assert results["ok"].get(timeout=15) == "done:ok"
        with pytest.raises(ValueError, match="planned failure of fail"):
            results["fail"].get(timeout=15)
        assert results["retry"].get(timeout=15) == "done:retry:2"
        assert results["vec"].get(timeout=15) == behaviour.VECTOR
        with pytest.raises(TaskRevokedError):
            results["revoke"].get(timeout=15)

        def by_id() -> dict[str, list[dict]]:
            out: dict[str, list[dict]] = {k: [] for k in results}
            ids = {r.id: k for k, r in results.items()}
            for ev in list(seen):
                if ev.get("uuid") in ids:
                    out[ids[ev["uuid"]]].append(ev)
            return out

        final = {"ok": "task-succeeded", "fail": "task-failed", "retry": "task-succeeded",
                 "revoke": "task-revoked", "vec": "task-succeeded"}
        # Wait for each item's last event, then let the assertions below say what is missing.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not all(
                any(e["type"] == final[k] for e in evs) for k, evs in by_id().items()):
            time.sleep(0.05)
        time.sleep(0.3)  # anything sent after the final events would show up now
    events = by_id()
    types = {k: [e["type"] for e in evs] for k, evs in events.items()}

    assert types["ok"] == ["task-received", "task-started", "task-succeeded"]
    assert events["ok"][-1]["result"] == repr("done:ok")
    assert types["fail"] == ["task-received", "task-started", "task-failed"]
    assert "planned failure of fail" in events["fail"][-1]["exception"]
    assert types["revoke"] == ["task-received", "task-revoked"], "a revoked item never starts"
    assert not any("revoke" in run["keys"] for run in execs(redis_client, "evented"))
    # The retry is received again (Celery re-sends it) and runs in a later batch.
    assert Counter(types["retry"]) == {"task-received": 2, "task-started": 2,
                                       "task-retried": 1, "task-succeeded": 1}
    assert types["retry"][0] == "task-received" and types["retry"][-1] == "task-succeeded"
    assert types["retry"].index("task-retried") < types["retry"].index("task-succeeded")
    # A 384-float result: a bounded repr, not the whole vector (~7,000 characters).
    assert types["vec"] == ["task-received", "task-started", "task-succeeded"]
    vec_repr = events["vec"][-1]["result"]
    assert vec_repr.startswith("[0.0, 0.3333333333333333, 0.6666666666666666")
    assert len(vec_repr) <= 1100, len(vec_repr)


# ------------------------------------------------------------------------------------------------
# 8. One traceback per failing batch
# ------------------------------------------------------------------------------------------------

def test_raising_batch_logs_one_traceback_and_stores_the_users_frame(redis_client, queue,
                                                                      start_worker):
    worker = start_worker(APP, queues=queue)
    results = [behaviour.exploding.apply_async((i,), queue=queue) for i in range(4)]
    for r in results:
        with pytest.raises(RuntimeError, match="model blew up on 4 inputs"):
            r.get(timeout=10)
    wait_for(lambda: re.search(r"Batch \S+ of 4 tests\.apps\.behaviour\.exploding .* done",
                               worker.log()), 10, what="the batch's log line")
    time.sleep(0.3)
    log = worker.log()
    assert log.count("Traceback (most recent call last)") == 1, log[-4000:]

    tracebacks = [r.traceback for r in results]
    assert tracebacks[0] and all(tb == tracebacks[0] for tb in tracebacks)
    lines = tracebacks[0].rstrip().splitlines()
    last_frame = max(i for i, line in enumerate(lines) if line.lstrip().startswith('File "'))
    assert "behaviour.py" in lines[last_frame] and "exploding" in lines[last_frame]
    assert 'raise RuntimeError(f"model blew up on {len(xs)} inputs")' in lines[last_frame + 1]
    assert lines[-2] == "RuntimeError: model blew up on 4 inputs"
    # ... and a note (PEP 678) says it was raised for the whole batch, not by this item alone.
    assert re.fullmatch(r"celery_batched: tests\.apps\.behaviour\.exploding raised this for the "
                        r"whole batch \S+ \(4 items\), not for this item alone: .*", lines[-1])


# ------------------------------------------------------------------------------------------------
# 9. rate_limit is refused for batched tasks
# ------------------------------------------------------------------------------------------------

def test_rate_limit_command_refuses_batched_tasks(redis_client, queue, start_worker):
    worker = start_worker(APP, queues=queue)
    control = behaviour.app.control
    (reply,) = control.rate_limit(behaviour.doubled.name, "10/s", reply=True,
                                  destination=[worker.hostname], timeout=5)
    answer = reply[worker.hostname]
    assert "error" in answer, answer
    assert "rate limit" in answer["error"] and "batched" in answer["error"]
    assert "set successfully" not in json.dumps(answer)

    (reply,) = control.rate_limit(behaviour.plain_double.name, "10/s", reply=True,
                                  destination=[worker.hostname], timeout=5)
    assert reply[worker.hostname] == {"ok": "new rate limit set successfully"}
    # Both tasks still run.
    assert behaviour.doubled.apply_async((4,), queue=queue).get(timeout=10) == 8
    assert behaviour.plain_double.apply_async((5,), queue=queue).get(timeout=10) == 10


# ------------------------------------------------------------------------------------------------
# 10. Refusing to start when misconfigured
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("serializer, module, hint", [
    ("yaml", "yaml", "pip install PyYAML"),
    ("msgpack", "msgpack", "pip install msgpack"),
])
def test_refuses_to_start_without_the_result_serializers_library(redis_client, queue,
                                                                 start_worker, tmp_path,
                                                                 serializer, module, hint):
    # PyYAML and msgpack are both installed in .venv (transformers needs PyYAML): hide the
    # library from the worker, which then sees what kombu sees where it is missing (kombu's
    # register_yaml/register_msgpack take their ImportError branch).
    shadow = tmp_path / f"no_{module}"
    shadow.mkdir()
    (shadow / f"{module}.py").write_text(
        f"raise ImportError('No module named {module} (hidden by the test)')\n")
    pythonpath = f"{shadow}{os.pathsep}{ROOT}"
    probe = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True,
                           env={**os.environ, "PYTHONPATH": pythonpath})
    assert probe.returncode != 0, f"the test could not hide {module}"

    code, log = exits_before_ready(start_worker, APP, queue, {
        "BEHAVIOUR_RESULT_SERIALIZER": serializer, "PYTHONPATH": pythonpath})
    assert code != 0
    assert " ready." not in log
    assert "WorkerConfigurationError" in log
    assert f"result_serializer={serializer!r}" in log
    assert hint in log


def test_refuses_to_start_with_visibility_timeout_below_time_limit(redis_client, queue,
                                                                   start_worker):
    code, log = exits_before_ready(start_worker, APP, queue, {"BEHAVIOUR_VISIBILITY_TIMEOUT": "5"})
    assert code != 0
    assert " ready." not in log
    assert "WorkerConfigurationError" in log
    assert "visibility_timeout" in log
    assert behaviour.limited.name in log


# ------------------------------------------------------------------------------------------------
# 11. The garbage collector during bulk submit
# ------------------------------------------------------------------------------------------------

def test_bulk_submit_keeps_the_garbage_collector_enabled(redis_client, queue):
    assert gc.isenabled()
    samples: list[bool] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append(gc.isenabled())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        results = behaviour.pair_sum.starmap_items([(i, i) for i in range(50_000)], queue=queue)
    finally:
        stop.set()
        sampler.join(5)
    try:
        assert len(results) == 50_000
        assert redis_client.llen(queue) == 50_000
        assert len(samples) >= 10, "the sampler didn't run during the submit"
        assert all(samples), f"gc was disabled in {samples.count(False)} of {len(samples)} samples"
        assert gc.isenabled()
    finally:
        redis_client.delete(*redis_client.keys(f"{queue}*") or [queue])

    with pytest.raises(ItemArgumentsError):
        behaviour.pair_sum.starmap_items([(1, 2)] * 1000 + [(1,)], queue=queue)
    assert gc.isenabled()
    assert redis_client.llen(queue) == 0


# ------------------------------------------------------------------------------------------------
# 12. Acks happen on the consumer's thread
# ------------------------------------------------------------------------------------------------

def test_acks_run_on_the_consumer_thread_with_a_threads_pool(redis_client, queue, start_worker):
    start_worker(APP, queues=queue, pool="threads", concurrency=2,
                 env={"BEHAVIOUR_RECORD_ACKS": "1"})
    results = behaviour.threaded.map_items(range(200), queue=queue)
    assert results.get(timeout=30) == [x + 7 for x in range(200)]
    ids = {r.id for r in results}
    wait_for(lambda: not ids & unacked_ids(redis_client), 10, what="every message acknowledged")

    def acks_recorded() -> int:  # each ack is recorded just after it left the unacked index
        return sum(1 for r in redis_client.lrange("ack-threads", 0, -1) if r.startswith(b"QoS.ack:"))

    wait_for(lambda: acks_recorded() >= 200, 10, what="200 recorded acknowledgements")
    records = [r.decode() for r in redis_client.lrange("ack-threads", 0, -1)]
    assert records, "no acknowledgement was recorded"
    threads = Counter(r.split(":", 1)[1] for r in records)
    assert set(threads) == {"MainThread"}, Counter(records)
    # Every message went through a recorded path: the test saw all 200 acks, not a few.
    assert sum(1 for r in records if r.startswith("QoS.ack:")) >= 200, Counter(records)


def test_one_options_table_feeds_the_task_the_control_command_and_the_docs():
    """``spec.OPTIONS`` is the one table: BatchedTask's defaults, what configure_batching may
    change (and its command-line signature), and the options table of docs/writing-tasks.md."""
    from celery.worker.control import Panel

    from celery_batched import BatchedTask
    from celery_batched.spec import OPTIONS, RECONFIGURABLE, options_table

    for option in OPTIONS:
        assert getattr(BatchedTask, option.name) == option.default, option.name
    signature = Panel.meta["configure_batching"].signature
    assert signature.endswith("(" + ", ".join(RECONFIGURABLE) + ")"), signature
    page = (ROOT / "docs" / "writing-tasks.md").read_text()
    begin, end = "<!-- options:begin", "<!-- options:end -->"
    shown = page[page.index(begin):page.index(end)]
    assert shown.split("\n", 1)[1].strip() == options_table(), \
        "docs/writing-tasks.md's options table is not celery_batched/spec.py's OPTIONS"
