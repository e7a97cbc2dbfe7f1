"""Batching policies on a real worker: batch_key, max_open_keys, batch_cost, split on
out-of-memory, max_latency_ms."""

from __future__ import annotations

import json
import statistics
import time
from collections import Counter

import pytest
from celery import states

from celery_batched import ItemPolicyError, batching_stats

from .apps import policies
from .workers import wait_for

APP = "tests.apps.policies"


def execs(redis_client, name: str) -> list[dict]:
    return [json.loads(x) for x in redis_client.lrange(f"exec:{name}", 0, -1)]


def stats(worker, name: str) -> dict:
    return batching_stats(policies.app, timeout=2.0,
                          destination=[worker.hostname]).get(worker.hostname, {}).get(name, {})


def test_batch_key_by_parameter_name_never_mixes_keys(redis_client, queue, start_worker):
    start_worker(APP, queues=queue)
    sent = [("a" if i % 3 else "b", i) for i in range(24)]  # interleaved: a a b a a b ...
    results = policies.by_model.starmap_items(sent, queue=queue)
    assert results.get(timeout=30) == [f"{m}:{x}" for m, x in sent]
    runs = execs(redis_client, "by_model")
    assert all(len(set(r["model"])) == 1 for r in runs), runs
    assert max(len(r["xs"]) for r in runs) == 4
    # Each key's items ran in their order, in batches of max_batch_size (16 a's, 8 b's).
    by_key = {k: [x for r in runs if r["model"][0] == k for x in r["xs"]] for k in "ab"}
    assert by_key == {k: [x for m, x in sent if m == k] for k in "ab"}
    assert sorted(Counter(len(r["xs"]) for r in runs).items()) == [(4, 6)]


def test_batch_key_function_buckets_and_bad_keys_fail_alone(redis_client, queue, start_worker):
    worker = start_worker(APP, queues=queue)
    texts = ["x" * n for n in (1, 15, 3, 25, 12, 40, 2)] + ["boom", "unhashable", "y" * 11]
    results = policies.by_length.map_items(texts, queue=queue)
    for r, text in zip(results, texts):
        if text in ("boom", "unhashable"):
            with pytest.raises(ItemPolicyError) as info:
                r.get(timeout=30)
            assert r.state == states.FAILURE
            assert "batch_key (length_bucket)" in str(info.value)
            assert ("raised ValueError" in str(info.value) if text == "boom"
                    else "unhashable" in str(info.value))
        else:
            assert r.get(timeout=30) == len(text)
    runs = execs(redis_client, "by_length")
    buckets = [{min(len(t) // 10, 3) for t in r["texts"]} for r in runs]
    assert all(len(b) == 1 for b in buckets), runs
    assert sorted(len(t) for r in runs for t in r["texts"]) == sorted(
        len(t) for t in texts if t not in ("boom", "unhashable"))
    wait_for(lambda: stats(worker, policies.by_length.name).get("flush_reasons", {})
             .get("invalid_item") == 2, 10, what="two invalid-item flushes")


def test_max_open_keys_flushes_the_oldest_waiting_key(redis_client, queue, start_worker):
    worker = start_worker(APP, queues=queue)
    # wait_ms is 1.5 s: only the key bound can flush a before c arrives.
    a = policies.few_keys.apply_async(("a", 1), queue=queue)
    b = policies.few_keys.apply_async(("b", 2), queue=queue)
    wait_for(lambda: stats(worker, policies.few_keys.name).get("open_keys") == 2 or a.ready(),
             10, what="two keys open")
    t_c = time.monotonic()
    c = policies.few_keys.apply_async(("c", 3), queue=queue)
    assert a.get(timeout=10) == 1
    runs = execs(redis_client, "few_keys")
    assert runs[0]["k"] == ["a"] and runs[0]["t"] - t_c < 1.0  # flushed by c, not by its wait
    assert (b.get(timeout=10), c.get(timeout=10)) == (2, 3)
    assert all(len(set(r["k"])) == 1 for r in execs(redis_client, "few_keys"))
    reasons = stats(worker, policies.few_keys.name)["flush_reasons"]
    assert reasons.get("max_open_keys") == 1 and reasons.get("wait_ms") == 2, reasons


def test_max_batch_cost_bounds_batches_and_big_items_run_alone(redis_client, queue, start_worker):
    worker = start_worker(APP, queues=queue)
    texts = ["t" * 30] * 10 + ["B" * 150] + ["t" * 30] * 2
    results = policies.costly.map_items(texts, queue=queue)
    assert results.get(timeout=30) == [len(t) for t in texts]
    runs = execs(redis_client, "costly")
    assert sum(r["n"] for r in runs) == len(texts)
    alone = [r for r in runs if r["cost"] > 100]
    assert alone == [{**alone[0], "cost": 150, "n": 1}], runs
    assert all(r["cost"] <= 100 for r in runs if r not in alone)
    assert max(r["n"] for r in runs if r not in alone) == 3  # 3 x 30 fits, 4 x 30 doesn't
    reasons = stats(worker, policies.costly.name)["flush_reasons"]
    assert reasons.get("max_batch_cost", 0) >= 3, reasons


def test_out_of_memory_splits_remembers_the_size_and_fails_items_alone(redis_client, queue,
                                                                       start_worker):
    torch = pytest.importorskip("torch")
    start_worker(APP, queues=queue)
    first = policies.fits_eight.map_items(range(32), queue=queue)
    assert first.get(timeout=30) == [x * 2 for x in range(32)]
    calls = [(r["n"], r["ok"]) for r in execs(redis_client, "fits_eight")]
    # 32 fails, each half of 16 fails and runs as two calls of 8.
    assert calls == [(32, False), (16, False), (8, True), (8, True),
                     (16, False), (8, True), (8, True)], calls
    redis_client.delete("exec:fits_eight")
    # The next batch is cut into calls of the size that fitted: no out-of-memory error.
    second = policies.fits_eight.map_items(range(100, 132), queue=queue)
    assert second.get(timeout=30) == [x * 2 for x in range(100, 132)]
    assert [(r["n"], r["ok"]) for r in execs(redis_client, "fits_eight")] == [(8, True)] * 4
    redis_client.delete("exec:fits_eight")
    # An item that runs out of memory even alone fails alone; its neighbours succeed.
    third = policies.fits_eight.map_items([-1] + list(range(1, 32)), queue=queue)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        third[0].get(timeout=30)
    assert third[0].state == states.FAILURE
    assert [r.get(timeout=30) for r in third[1:]] == [x * 2 for x in range(1, 32)]
    calls = [(r["n"], r["ok"]) for r in execs(redis_client, "fits_eight")]
    assert calls[:4] == [(8, False), (4, False), (2, False), (1, False)], calls
    assert sum(n for n, ok in calls if ok) == 31


def test_latency_target_flushes_early_when_slow_and_fills_when_busy(redis_client, queue,
                                                                   start_worker):
    worker = start_worker(APP, queues=queue)
    name = policies.latency_target.name
    # A trickle (one item per 0.4 s) can't fill a batch of 16 in 300 ms: each runs at once.
    sent_at, trickle = [], []
    for i in range(5):
        sent_at.append(time.monotonic())
        trickle.append(policies.latency_target.apply_async((i,), queue=queue))
        trickle[-1].get(timeout=10)
        time.sleep(0.4)
    runs = execs(redis_client, "latency_target")
    assert [r["xs"] for r in runs] == [[i] for i in range(5)]
    # A fixed wait would hold each item ~250 ms; the target's buffer lets it go at once.
    assert statistics.median(r["t"] - s for r, s in zip(runs, sent_at)) < 0.15
    redis_client.delete("exec:latency_target")
    # 200 items/s: 16 arrive in 80 ms, well within 300 ms - 50 ms: batches fill.
    steady = []
    for i in range(160):
        steady.append(policies.latency_target.apply_async((i,), queue=queue))
        time.sleep(0.005)
    assert [r.get(timeout=30) for r in steady] == list(range(160))
    sizes = [len(r["xs"]) for r in execs(redis_client, "latency_target")]
    assert statistics.mean(sizes) >= 8, sizes
    got = stats(worker, name)
    assert got["flush_reasons"].get("latency_target", 0) >= 5, got
    assert got["flush_reasons"].get("size", 0) >= 3, got
    assert 30 <= got["latency"]["expected_exec_ms_1"] <= 300, got


@pytest.mark.parametrize("options, error, says", [
    ({"batch_key": "nope"}, "BatchedTaskDefinitionError", "names no parameter"),
    ({"batch_key": lambda a, b: a}, "BatchedTaskDefinitionError", "can't take them"),
    ({"batch_key": 3}, "BatchedTaskDefinitionError", "must be a function"),
    ({"max_open_keys": 0}, "BatchedTaskOptionError", "max_open_keys must be an int >= 1"),
    ({"batch_cost": len}, "BatchedTaskOptionError", "batch_cost needs max_batch_cost"),
    ({"max_batch_cost": 10}, "BatchedTaskOptionError", "max_batch_cost needs batch_cost"),
    ({"batch_cost": len, "max_batch_cost": 0}, "BatchedTaskOptionError", "finite number > 0"),
    ({"max_latency_ms": -5}, "BatchedTaskOptionError", "max_latency_ms must be"),
    ({"max_latency_ms": 50, "wait_ms": 5}, "BatchedTaskOptionError", "not both"),
    ({"oom_errors": ("MemoryError",)}, "BatchedTaskOptionError", "must be exception classes"),
])
def test_policy_options_are_checked_at_definition(options, error, says):
    from celery import Celery

    from celery_batched import BatchedTask

    app = Celery("definitions", set_as_current=False)

    def texts_fn(texts: list[str]) -> list[str]:
        return texts

    with pytest.raises(Exception) as info:
        app.task(base=BatchedTask, name="bad", shared=False, **options)(texts_fn)._batch_spec
    assert type(info.value).__name__ == error and says in str(info.value), info.value


def test_fit_limit_remembers_the_size_that_fitted_and_grows_back():
    from celery_batched.pool.oom import GROW_AFTER, FitLimit

    fit = FitLimit(max_batch_size=64)
    fit.out_of_memory(64)
    fit.out_of_memory(32)
    fit.succeeded(16)
    fit.succeeded(16)
    fit.out_of_memory(32)
    assert fit.limit == 16
    for _ in range(GROW_AFTER):
        fit.succeeded(16)
    assert fit.limit == 20
    fit.out_of_memory(20)
    assert fit.limit == 16  # back to what last fitted, not half of 20
    for size in (16, 20, 25, 31, 38, 47, 58):
        assert fit.limit == size
        for _ in range(GROW_AFTER):
            fit.succeeded(size)
    assert fit.limit is None  # grew back to max_batch_size: no limit


def test_latency_model_fits_execution_time_and_decides_to_wait():
    from celery_batched.worker.latency import LatencyModel

    model = LatencyModel(target_ms=100, max_batch_size=32)
    for n in (1, 8, 16, 32, 4, 24) * 5:
        model.observe(n, 0.010 + 0.001 * n)  # 10 ms + 1 ms per item
    assert model.execution_s(1) == pytest.approx(0.011, abs=1e-4)
    assert model.execution_s(32) == pytest.approx(0.042, abs=1e-4)
    deadline = model.deadline(first_at=0.0, n=1)
    assert deadline == pytest.approx(0.089, abs=1e-4)
    assert not model.worth_waiting("k", 1, 0.0, deadline)  # no arrival rate yet: go now
    for i in range(10):
        model.arrived("k", i * 0.001)  # 1000 items/s: 31 more in 31 ms
    assert model.worth_waiting("k", 1, 0.01, deadline)
    for i in range(10):
        model.arrived("slow", i * 0.1)  # 10 items/s: can't fill in time
    assert not model.worth_waiting("slow", 1, 1.0, 1.0 + deadline)
