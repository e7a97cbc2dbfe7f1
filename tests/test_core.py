"""Core engine behaviour through real worker processes and a real Redis."""

from __future__ import annotations

import gc
import json
import re
import sys
import time
import uuid

import pytest
from celery import states

from celery_batched import BatchResultError, ItemArgumentsError, ItemResultEncodeError

from .apps import calc
from .conftest import REDIS_URL
from .workers import captured_events, exits_before_ready, wait_for

APP = "tests.apps.calc"


def execs(redis_client, name: str) -> list[dict]:
    return [json.loads(x) for x in redis_client.lrange(f"exec:{name}", 0, -1)]


@pytest.mark.parametrize("pool", ["prefork", "threads", "solo"])
def test_seed_example_two_executions(redis_client, queue, start_worker, pool):
    start_worker(APP, queues=queue, pool=pool)
    sent = time.monotonic()
    results = [calc.batch_add.apply_async((x, y), queue=queue)
               for x, y in [(1, 300), (2, 200), (3, 100)]]
    assert [r.get(timeout=15) for r in results] == [301, 202, 103]
    runs = execs(redis_client, "batch_add")
    assert [(r["xs"], r["ys"]) for r in runs] == [([1, 2], [300, 200]), ([3], [100])]
    # The first batch is full at once; the second waits wait_ms (1000) from its first item.
    assert runs[0]["t"] - sent < 0.5
    assert 0.9 <= runs[1]["t"] - runs[0]["t"] < 1.6


def test_async_function_is_awaited(redis_client, queue, start_worker):
    start_worker(APP, queues=queue)
    results = [calc.async_add.apply_async((x, y), queue=queue) for x, y in [(1, 300), (2, 200), (3, 100)]]
    assert [r.get(timeout=15) for r in results] == [301, 202, 103]
    assert [r["xs"] for r in execs(redis_client, "async_add")] == [[1, 2], [3]]


def test_size_flush_does_not_wait(redis_client, queue, start_worker):
    start_worker(APP, queues=queue)
    results = [calc.sized.apply_async((i,), queue=queue) for i in range(8)]
    # wait_ms is 60 s: only the size rule can have flushed these.
    assert [r.get(timeout=10) for r in results] == [i * 10 for i in range(8)]
    assert [r["xs"] for r in execs(redis_client, "sized")] == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_time_flush_counts_from_first_item(redis_client, queue, start_worker):
    start_worker(APP, queues=queue)
    first = calc.timed.apply_async((1,), queue=queue)
    t_first = time.monotonic()
    time.sleep(0.5)
    second = calc.timed.apply_async((2,), queue=queue)
    assert (first.get(timeout=10), second.get(timeout=10)) == (-1, -2)
    (run,) = execs(redis_client, "timed")
    assert run["xs"] == [1, 2]
    # From the first item: ~1.0 s. From the last item it would be ~1.5 s.
    assert 0.95 <= run["t"] - t_first < 1.35


def test_partial_batch_keeps_filling_while_the_pool_is_busy(redis_client, queue, start_worker):
    start_worker(APP, queues=queue, pool="prefork", concurrency=1)
    first = calc.slow_batch.apply_async((0,), queue=queue)
    time.sleep(0.2)  # batch [0] is running for 0.6 s
    rest = []
    for i in range(1, 11):  # over 0.2 s: each wait_ms (50) expires while the pool is busy
        rest.append(calc.slow_batch.apply_async((i,), queue=queue))
        time.sleep(0.02)
    assert [r.get(timeout=10) for r in [first, *rest]] == list(range(11))
    assert [r["xs"] for r in execs(redis_client, "slow_batch")] == [[0], list(range(1, 11))]


def test_burst_of_1000_never_exceeds_max_batch_size(redis_client, queue, start_worker):
    start_worker(APP, queues=queue)
    results = [calc.burst.apply_async((i,), queue=queue) for i in range(1000)]
    assert [r.get(timeout=60) for r in results] == [i + 1 for i in range(1000)]
    sizes = [r["n"] for r in execs(redis_client, "burst")]
    assert sum(sizes) == 1000
    assert max(sizes) <= 50
    assert max(sizes) > 1, "nothing was batched"


def test_backlog_drains_in_full_batches_with_default_prefetch(redis_client, queue, start_worker):
    results = [calc.backlog.apply_async((i,), queue=queue) for i in range(520)]
    # Default worker settings: prefork -c 1, prefetch multiplier 4 -> Celery alone would hold 4.
    start_worker(APP, queues=queue, pool="prefork", concurrency=1)
    assert [r.get(timeout=60) for r in results] == [i * 2 for i in range(520)]
    sizes = [r["n"] for r in execs(redis_client, "backlog")]
    assert sizes == [50] * 10 + [20]


def test_item_returned_exception_fails_alone(redis_client, queue, start_worker):
    start_worker(APP, queues=queue)
    results = [calc.per_item.apply_async((i,), queue=queue) for i in range(6)]
    for i, r in enumerate(results):
        if i % 2:
            with pytest.raises(ValueError, match=f"odd input {i}"):
                r.get(timeout=10)
            assert r.state == states.FAILURE
        else:
            assert r.get(timeout=10) == i
            assert r.state == states.SUCCESS
    assert len(execs(redis_client, "per_item")) == 1


def test_raising_function_fails_every_item(redis_client, queue, start_worker):
    start_worker(APP, queues=queue)
    results = [calc.raiser.apply_async((i,), queue=queue) for i in range(3)]
    for r in results:
        with pytest.raises(RuntimeError, match="model exploded on a batch of 3"):
            r.get(timeout=10)
        assert r.state == states.FAILURE


def test_wrong_length_fails_every_item_with_clear_error(redis_client, queue, start_worker):
    start_worker(APP, queues=queue)
    results = [calc.wrong_len.apply_async((i,), queue=queue) for i in range(3)]
    for r in results:
        with pytest.raises(BatchResultError) as err:
            r.get(timeout=10)
        assert "tests.apps.calc.wrong_len" in str(err.value)
        assert "received 3 items but returned a list of 2" in str(err.value)


def test_bad_arity_item_fails_alone(redis_client, queue, start_worker):
    start_worker(APP, queues=queue)
    name = calc.kw.name
    good = [calc.kw.apply_async((1, 2), {"c": 3}, queue=queue),
            calc.kw.apply_async((4,), {"b": 5, "c": 6}, queue=queue)]
    # send_task skips the caller-side argument check, as a foreign producer would.
    bad = {
        "too many": calc.app.send_task(name, (1, 2, 3), {"c": 4}, queue=queue),
        "unknown keyword": calc.app.send_task(name, (1, 2), {"c": 3, "d": 4}, queue=queue),
        "missing": calc.app.send_task(name, (1,), {"c": 3}, queue=queue),
    }
    assert [r.get(timeout=10) for r in good] == [123, 456]
    expected = {"too many": "takes 2 positional argument", "unknown keyword": "unexpected keyword argument 'd'",
                "missing": "missing 1 argument(s) for this item: 'b'"}
    for what, r in bad.items():
        with pytest.raises(ItemArgumentsError, match=re.escape(expected[what])):
            r.get(timeout=10)
    (run,) = execs(redis_client, "kw")
    assert run == {**run, "a": [1, 4], "b": [2, 5], "c": [3, 6]}


@pytest.mark.parametrize("broken", [b'[[1], {}, {', b'', b'[[1], {}, {}], [[2], {}, {}]', b'\xff[[1]'],
                         ids=["truncated", "empty", "two-values", "not-utf8"])
def test_undecodable_body_fails_alone(redis_client, queue, start_worker, broken):
    """The pool decodes a batch's bodies in one call; a body that breaks it fails alone."""
    from celery_batched.errors import ItemDecodeError

    start_worker(APP, queues=queue)
    good = [calc.sized.apply_async((i,), queue=queue) for i in (1, 2)]
    bad_id = str(uuid.uuid4())
    with calc.app.producer_or_acquire() as producer:
        producer.publish(broken, routing_key=queue, exchange="", content_type="application/json",
                         content_encoding="utf-8", serializer=None,
                         headers={"id": bad_id, "task": calc.sized.name, "lang": "py"})
    good.append(calc.sized.apply_async((3,), queue=queue))
    assert [r.get(timeout=10) for r in good] == [10, 20, 30]
    with pytest.raises(ItemDecodeError, match=re.escape(f"{calc.sized.name}[{bad_id}]: this item's "
                                                        f"message body could not be decoded")):
        calc.app.AsyncResult(bad_id).get(timeout=10)
    assert [r["xs"] for r in execs(redis_client, "sized")] == [[1, 2, 3]]


def test_joined_json_decode_is_each_bodys_decode():
    from celery_batched._internals import trace

    accept = frozenset({"application/json"})
    bodies = [b'[[1], {}, {"callbacks": null}]', b'[[{"a": [1, 2.5, "\\u00e9"]}], {"k": null}, {}]',
              b' [["x y"], {}, null] ', '[["\u00e9"], {}, {}]'.encode()]
    joined = trace.decode_json_bodies(bodies)
    assert joined is not None
    assert [trace.split_body(d) for d in joined] == [
        trace.decode_body(b, "application/json", "utf-8", accept) for b in bodies]
    # Whatever kombu's hook would rewrite, or a body that isn't one value, is left to each alone.
    assert trace.decode_json_bodies([*bodies, b'[[{"__type__": "datetime"}], {}, {}]']) is None
    assert trace.decode_json_bodies([*bodies, b'1, 2']) is None
    assert trace.decode_json_bodies([*bodies, b'']) is None


def test_keyword_arguments(redis_client, queue, start_worker):
    start_worker(APP, queues=queue)
    assert calc.batch_add.apply_async((1,), {"ys": 300}, queue=queue).get(timeout=10) == 301
    assert calc.batch_add.s(xs=2, ys=200).set(queue=queue).delay().get(timeout=10) == 202


def test_caller_side_arity_check():
    with pytest.raises(TypeError):
        calc.batch_add.delay(1, 2, 3)


def test_class_based_setup_once_per_process(redis_client, queue, start_worker):
    start_worker(APP, queues=queue, pool="prefork", concurrency=2)
    results = [calc.scaler.apply_async((i,), queue=queue) for i in range(200)]
    assert [r.get(timeout=30) for r in results] == [i * 3 for i in range(200)]
    setups = [int(p) for p in redis_client.lrange("setup:scaler", 0, -1)]
    executing = {r["pid"] for r in execs(redis_client, "scaler")}
    assert len(setups) == len(set(setups)), "setup() ran twice in one process"
    assert executing <= set(setups)
    assert max(r["n"] for r in execs(redis_client, "scaler")) <= 8


def _interpreter_state(worker) -> dict:
    replies = calc.app.control.broadcast("interpreter_state", destination=[worker.hostname],
                                         reply=True, timeout=5)
    return replies[0][worker.hostname]


@pytest.mark.parametrize("freeze", [True, False], ids=["batching_gc_freeze", "off"])
def test_startup_heap_is_frozen_in_the_worker_and_its_pool(redis_client, queue, start_worker,
                                                           freeze):
    worker = start_worker(APP, queues=queue, pool="prefork",
                          env={"TEST_GC_FREEZE": "1" if freeze else "0"})
    in_pool = [r.get(timeout=15) for r in
               [calc.frozen_objects.apply_async((i,), queue=queue) for i in range(3)]]
    in_main = _interpreter_state(worker)["frozen"]
    if freeze:
        # Celery, kombu and the app: tens of thousands of objects, out of every full GC pass.
        assert in_main > 10_000, in_main
        assert min(in_pool) > 10_000, in_pool
    else:
        assert (in_main, in_pool) == (0, [0, 0, 0])


@pytest.mark.parametrize("setting, expected", [
    (None, 0.005),       # not set: Python's own
    ("0.0005", 0.0005),
    ("none", 0.005),
])
def test_gil_switch_interval_of_the_worker(redis_client, queue, start_worker, setting, expected):
    env = {} if setting is None else {"TEST_SWITCH_INTERVAL": setting}
    worker = start_worker(APP, queues=queue, env=env)
    assert calc.batch_add.apply_async((1, 2), queue=queue).get(timeout=15) == 3
    assert _interpreter_state(worker)["switch_interval"] == pytest.approx(expected)


@pytest.mark.parametrize("setting", ["fast", "0", "-1"])
def test_refuses_to_start_with_a_bad_switch_interval(redis_client, queue, start_worker, setting):
    code, log = exits_before_ready(start_worker, APP, queue, {"TEST_SWITCH_INTERVAL": setting})
    assert code != 0
    assert "WorkerConfigurationError" in log
    assert f"batching_switch_interval={setting!r} is not a GIL switch interval" in log


def test_an_embedded_worker_gives_the_interpreter_back(redis_client):
    """A worker run inside another program (``celery.contrib.testing``) leaves the program's
    GIL switch interval and garbage collector as it found them."""
    from celery.contrib.testing.worker import start_worker as embedded_worker

    assert (sys.getswitchinterval(), gc.get_freeze_count()) == (pytest.approx(0.005), 0)
    calc.app.conf.batching_switch_interval = 0.0005
    try:
        with embedded_worker(calc.app, pool="solo", perform_ping_check=False,
                             queues=[f"q{uuid.uuid4().hex[:10]}"], shutdown_timeout=15):
            assert sys.getswitchinterval() == pytest.approx(0.0005)
            assert gc.get_freeze_count() > 10_000
    finally:
        calc.app.conf.batching_switch_interval = None
    assert (sys.getswitchinterval(), gc.get_freeze_count()) == (pytest.approx(0.005), 0)


def test_a_direct_or_eager_call_leaves_the_callers_heap_alone():
    """``setup()`` run outside a worker (a direct call, eager mode) doesn't freeze the calling
    program's heap: that is a worker's tuning, and a frozen cycle is never collected."""
    assert gc.get_freeze_count() == 0
    assert calc.sized(4) == 40  # a batch of one, setup() and the function in this process
    calc.app.conf.task_always_eager = True
    try:
        assert calc.sized.delay(5).get() == 50
    finally:
        calc.app.conf.task_always_eager = False
    assert gc.get_freeze_count() == 0


def test_two_batched_tasks_share_a_worker(redis_client, queue, start_worker):
    start_worker(APP, queues=queue, pool="threads", concurrency=2)
    a = [calc.sized.apply_async((i,), queue=queue) for i in range(4)]
    b = [calc.timed.apply_async((i,), queue=queue) for i in range(3)]
    c = calc.plain_add.apply_async((2, 3), queue=queue)
    assert [r.get(timeout=10) for r in a] == [0, 10, 20, 30]
    assert [r.get(timeout=10) for r in b] == [0, -1, -2]
    assert c.get(timeout=10) == 5
    assert [r["xs"] for r in execs(redis_client, "sized")] == [[0, 1, 2, 3]]
    assert [r["xs"] for r in execs(redis_client, "timed")] == [[0, 1, 2]]


def test_result_is_stored_like_an_ordinary_task(redis_client, queue, start_worker):
    start_worker(APP, queues=queue, env={"TEST_RESULT_EXTENDED": "1"})
    calc.app.conf.result_extended = True
    try:
        r = calc.batch_add.apply_async((5, 6), queue=queue)
        assert r.get(timeout=10) == 11
        assert r.state == states.SUCCESS
        assert r.name == calc.batch_add.name
        assert r.args == [5, 6]
        assert r.queue == queue
    finally:
        calc.app.conf.result_extended = False
    ignored = calc.batch_add.apply_async((1, 1), queue=queue, ignore_result=True)
    marker = calc.batch_add.apply_async((2, 2), queue=queue)
    assert marker.get(timeout=10) == 4
    assert ignored.state == states.PENDING  # ignore_result: nothing stored
    assert [r["xs"] for r in execs(redis_client, "batch_add")][-1] == [1, 2]


def test_link_callback_gets_the_items_result(redis_client, queue, start_worker):
    start_worker(APP, queues=queue)
    cb = calc.collect.s("collected").set(queue=queue)
    r = calc.batch_add.apply_async((7, 8), queue=queue, link=cb)
    assert r.get(timeout=10) == 15
    wait_for(lambda: redis_client.lrange("collected", 0, -1), 10, what="link callback")
    assert json.loads(redis_client.lrange("collected", 0, -1)[0]) == 15


def test_chain_continues_with_each_items_result(redis_client, queue, start_worker):
    from celery import chain
    start_worker(APP, queues=queue)
    results = [chain(calc.batch_add.s(i, 1).set(queue=queue),
                     calc.batch_add.s(100).set(queue=queue)).apply_async() for i in range(3)]
    assert [r.get(timeout=15) for r in results] == [101, 102, 103]


def test_group_and_chord_of_batched_items(redis_client, queue, start_worker):
    from celery import chord, group
    start_worker(APP, queues=queue)
    g = group(calc.batch_add.s(i, i).set(queue=queue) for i in range(5)).apply_async()
    assert g.get(timeout=15) == [0, 2, 4, 6, 8]
    c = chord([calc.batch_add.s(i, 1).set(queue=queue) for i in range(6)],
              calc.total.s().set(queue=queue)).apply_async()
    assert c.get(timeout=20) == sum(i + 1 for i in range(6))
    assert [r["xs"] for r in execs(redis_client, "batch_add")][-3:] == [[0, 1], [2, 3], [4, 5]]


def test_unencodable_result_fails_only_that_item(redis_client, queue, start_worker):
    start_worker(APP, queues=queue)
    results = [calc.unencodable.apply_async((i,), queue=queue) for i in range(3)]
    with pytest.raises(ItemResultEncodeError, match="could not be stored"):
        results[0].get(timeout=10)
    assert [r.get(timeout=10) for r in results[1:]] == [1, 2]


def test_autoretry_is_per_item(redis_client, queue, start_worker):
    start_worker(APP, queues=queue)
    # "n:tag" fails until tried n times; max_retries=2 allows 3 tries.
    results = {k: calc.flaky.apply_async((k,), queue=queue) for k in ["1:a", "2:b", "3:c", "4:d"]}
    assert results["1:a"].get(timeout=15) == "ok:1:a:1"
    assert results["2:b"].get(timeout=15) == "ok:2:b:2"
    assert results["3:c"].get(timeout=15) == "ok:3:c:3"
    with pytest.raises(KeyError):
        results["4:d"].get(timeout=15)
    assert int(redis_client.get("tries:4:d")) == 3


def test_retry_backoff_is_honoured_per_item(redis_client, queue, start_worker):
    start_worker(APP, queues=queue)
    result = calc.backoff.apply_async(("k",), queue=queue)
    assert result.get(timeout=20) == "ok:k"
    tries = [float(t) for t in redis_client.lrange("tries-at:k", 0, -1)]
    assert len(tries) == 3
    # retry_backoff=1 without jitter: countdowns of 1 s, then 2 s -- no spinning.
    assert tries[1] - tries[0] >= 0.95
    assert tries[2] - tries[1] >= 1.95


def test_function_can_ask_to_retry_an_item(redis_client, queue, start_worker):
    start_worker(APP, queues=queue)
    results = [calc.asks_retry.apply_async((k,), queue=queue) for k in ["x", "y"]]
    assert [r.get(timeout=15) for r in results] == ["done:x", "done:y"]
    assert int(redis_client.get("tries:x")) == 2


def test_events_per_item(redis_client, queue, start_worker):
    start_worker(APP, queues=queue, extra_args=("-E",))
    with captured_events(calc.app) as seen:
        results = [calc.batch_add.apply_async((i, i), queue=queue) for i in range(4)]
        assert [r.get(timeout=10) for r in results] == [0, 2, 4, 6]
        ids = {r.id for r in results}

        def counts():
            c = {}
            for ev in seen:
                if ev.get("uuid") in ids:
                    c[ev["type"]] = c.get(ev["type"], 0) + 1
            return c
        wait_for(lambda: counts().get("task-succeeded") == 4, 10, what="4 task-succeeded events")
    assert counts() == {"task-received": 4, "task-started": 4, "task-succeeded": 4}


def test_eager_mode_runs_a_batch_of_one():
    assert calc.batch_add.apply(args=(1, 300)).get() == 301
    calc.app.conf.task_always_eager = True
    try:
        assert calc.batch_add.delay(2, ys=200).get() == 202
        assert calc.scaler.delay(5).get() == 15
        r = calc.per_item.apply(args=(3,))
        assert r.state == states.FAILURE
        assert isinstance(r.result, ValueError)
    finally:
        calc.app.conf.task_always_eager = False
    # Calling the task object directly is the item-level call; .run() is the list function.
    assert calc.batch_add(1, 2) == 3
    assert calc.batch_add.run([1, 2], [3, 4]) == [4, 6]


def test_bulk_submit_returns_results_in_order(redis_client, queue, start_worker):
    start_worker(APP, queues=queue)
    results = calc.burst.map_items(range(300), queue=queue)
    assert results.get(timeout=30) == [i + 1 for i in range(300)]
    assert [r.get(timeout=5) for r in results] == [i + 1 for i in range(300)]
    assert results[7].get(timeout=5) == 8 and len(results) == 300
    mixed = calc.batch_add.starmap_items([(1, 2), {"xs": 3, "ys": 4}], queue=queue)
    assert [r.get(timeout=10) for r in mixed] == [3, 7]


def test_bulk_submit_rejects_a_bad_item_before_sending(redis_client, queue):
    with pytest.raises(ItemArgumentsError, match="item 2500: .* takes 2 positional"):
        calc.batch_add.starmap_items([(1, 2)] * 2500 + [(1, 2, 3)], queue=queue)
    assert redis_client.llen(queue) == 0


PIPELINED = "tests.apps.pipelined"


@pytest.mark.parametrize("serializer", ["json", "msgpack"])
def test_next_call_runs_while_results_are_stored(redis_client, queue, start_worker, serializer):
    """Pipelining: with -c 1, the function's next call starts while the previous batch's
    results are still being stored (the store takes 0.15 s, a call 0.1 s), and every item gets
    its own 384-float vector back -- from a NumPy array, through json or msgpack."""
    from .apps import pipelined

    start_worker(PIPELINED, queues=queue, pool="prefork", concurrency=1,
                 env={"TEST_RESULT_SERIALIZER": serializer})
    from celery import Celery

    from celery_batched.client.submit import ItemResults

    sent = pipelined.vectors.map_items(range(96), queue=queue)
    client = Celery("client", backend=REDIS_URL)  # reads results as the worker writes them
    client.conf.update(result_serializer=serializer, result_accept_content=["json", "msgpack"])
    values = ItemResults(sent, client).get(timeout=60)
    assert [len(v) for v in values] == [384] * 96
    assert [v[0] for v in values] == list(range(96)) and all(v[0] == v[-1] for v in values)
    calls = [json.loads(x) for x in redis_client.lrange("pipeline:calls", 0, -1)]
    stores = [json.loads(x) for x in redis_client.lrange("pipeline:stores", 0, -1)]
    assert sum(n for _, _, n in calls) == 96
    overlapping = sum(1 for c_start, c_end, _ in calls
                      if any(s_start < c_end and c_start < s_end for s_start, s_end in stores))
    assert overlapping >= len(calls) // 2, (
        f"only {overlapping} of {len(calls)} calls ran while results were being stored")


def test_tensors_and_numpy_values_come_back_as_plain_lists(redis_client, queue, start_worker):
    pytest.importorskip("torch")
    from .apps import pipelined

    start_worker(PIPELINED, queues=queue)
    assert pipelined.tensor_rows.map_items([1, 2, 3], queue=queue).get(timeout=30) == [
        [0.5] * 4, [1.0] * 4, [1.5] * 4]
    assert pipelined.numpy_list.map_items([0, 1, 2], queue=queue).get(timeout=30) == [
        [0, 1, 2], 1.0, [2, 3, 4]]


def test_numpy_values_are_plain_where_the_pool_stores_them(redis_client, queue, start_worker):
    """With result_extended the pool stores results itself (Celery's own encoder): NumPy values
    in the returned list must reach it as plain lists and numbers too."""
    from .apps import pipelined

    start_worker(PIPELINED, queues=queue, env={"TEST_RESULT_EXTENDED": "1"})
    assert pipelined.numpy_list.map_items([0, 1], queue=queue).get(timeout=30) == [[0, 1, 2], 1.0]
