"""``preferred_batch_sizes``: a batch whose time is up leaves at a preferred size, the rest waits
once more; the function learns the size to pad to. On a real worker, then the buffer's rules
with each other policy, driven by a hand-run clock so the order of events is exact."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from celery_batched import FlushReason, batching_stats
from celery_batched.spec import BatchSpec
from celery_batched.worker.buffer import BatchBuffer
from celery_batched.worker.latency import LatencyModel

from .apps import policies
from .workers import wait_for

APP = "tests.apps.policies"


def calls(redis_client) -> list[dict]:
    return [json.loads(x) for x in redis_client.lrange("exec:fixed_shapes", 0, -1)]


def reasons(worker) -> dict:
    got = batching_stats(policies.app, timeout=2.0, destination=[worker.hostname])
    return got.get(worker.hostname, {}).get(policies.fixed_shapes.name, {}).get("flush_reasons", {})


def test_a_timed_out_batch_leaves_at_a_preferred_size_and_the_rest_waits_once(
        redis_client, queue, start_worker):
    worker = start_worker(APP, queues=queue)
    task = policies.fixed_shapes
    # 7 at once: after wait_ms the oldest 4 leave; 4, 5, 6 get one more wait, then go as 3
    # (padded to 4), since nothing else came.
    sent = task.map_items(range(7), queue=queue)
    assert sent.get(timeout=30) == [x * 3 for x in range(7)]
    runs = calls(redis_client)
    assert [(r["xs"], r["padded"]) for r in runs] == [([0, 1, 2, 3], 4), ([4, 5, 6], 4)], runs
    assert runs[1]["t"] - runs[0]["t"] >= 0.8  # held for a second wait_ms (1 s), not flushed
    assert reasons(worker) == {"preferred_size": 1, "wait_ms": 1}
    redis_client.delete("exec:fixed_shapes")

    # Full batches are untouched: 16 -> 8 + 8, each at its preferred size already.
    assert task.map_items(range(16), queue=queue).get(timeout=30) == [x * 3 for x in range(16)]
    assert [(len(r["xs"]), r["padded"]) for r in calls(redis_client)] == [(8, 8), (8, 8)]
    redis_client.delete("exec:fixed_shapes")

    # An item is held back once only: 7 -> 4 leave, 4 5 6 held; 7 and 8 join them. At the next
    # wait 5 items are due: the cut (4) must take the 3 held ones, so 4 5 6 7 leave, 8 waits.
    first = task.map_items(range(7), queue=queue)
    wait_for(lambda: calls(redis_client), 10, what="the first preferred-size flush")
    more = task.map_items([7, 8], queue=queue)
    assert first.get(timeout=30) + more.get(timeout=30) == [x * 3 for x in range(9)]
    assert [r["xs"] for r in calls(redis_client)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8]]


def test_configure_batching_keeps_the_sizes_that_fit_and_refuses_changing_them(
        redis_client, queue, start_worker):
    worker = start_worker(APP, queues=queue)
    task = policies.fixed_shapes

    def configure(*settings: str) -> dict:
        reply = policies.app.control.broadcast(
            "configure_batching", arguments={"task_name": task.name, "settings": list(settings)},
            destination=[worker.hostname], reply=True, timeout=5)
        return reply[0][worker.hostname]

    refused = configure("preferred_batch_sizes=16")
    assert "can't change preferred_batch_sizes" in refused["error"], refused
    ok = configure("max_batch_size=4")["ok"]
    assert ok["max_batch_size"] == 4 and ok["preferred_batch_sizes"] == [4, 8], ok
    # 8 can't be reached any more; 7 -> a full 4, then 3 at its wait (no size below 3 to cut at).
    assert task.map_items(range(7), queue=queue).get(timeout=30) == [x * 3 for x in range(7)]
    assert [(len(r["xs"]), r["padded"]) for r in calls(redis_client)] == [(4, 4), (3, 4)]
    assert reasons(worker) == {"size": 1, "wait_ms": 1}


@pytest.mark.parametrize("options, says", [
    ({"preferred_batch_sizes": (4, 16), "max_batch_size": 8}, "[16] exceed max_batch_size=8"),
    ({"preferred_batch_sizes": (), "max_batch_size": 8}, "non-empty list of ints"),
    ({"preferred_batch_sizes": 8}, "non-empty list of ints"),
    ({"preferred_batch_sizes": (0, 8)}, "non-empty list of ints >= 1"),
    ({"preferred_batch_sizes": (4.0,)}, "non-empty list of ints"),
])
def test_preferred_batch_sizes_are_checked_at_definition(options, says):
    from celery import Celery

    from celery_batched import BatchedTask, BatchedTaskOptionError

    app = Celery("definitions", set_as_current=False)

    def xs_fn(xs: list[int]) -> list[int]:
        return xs

    with pytest.raises(BatchedTaskOptionError) as info:
        app.task(base=BatchedTask, name="bad", shared=False, **options)(xs_fn)._batch_spec
    assert says in str(info.value) and "preferred_batch_sizes" in str(info.value), info.value


def test_padded_size_is_the_smallest_preferred_size_that_holds_the_batch():
    spec = _spec(preferred=(32, 8, 16, 8), max_batch_size=32)
    assert spec.preferred_batch_sizes == (8, 16, 32)
    assert [spec.padded_size(n) for n in (1, 8, 9, 16, 17, 32, 40)] == [8, 8, 16, 16, 32, 32, 40]
    assert _spec().padded_size(5) == 5  # no preferred sizes: no padding


# -- The buffer's rules with the other policies, on a clock the test moves by hand -------------

class Clock:
    """The event loop's timer, run by hand: ``fire()`` runs the callbacks that are due."""

    def __init__(self) -> None:
        self.entries: list[list[Any]] = []

    def call_after(self, secs: float, fun: Any, args: tuple[Any, ...] = ()) -> Any:
        entry = [secs, fun, args, False]
        self.entries.append(entry)
        return _Entry(entry)

    def fire(self) -> None:
        due, self.entries = [e for e in self.entries if not e[3]], []
        for _, fun, args, _ in due:
            fun(*args)


class _Entry:
    def __init__(self, entry: list[Any]) -> None:
        self.entry = entry

    def cancel(self) -> None:
        self.entry[3] = True


class Credit:
    def hold(self, n: int = 1) -> None: ...
    def resize(self, max_batch_size: int) -> None: ...
    def release(self, n: int) -> None: ...


class It:
    """What the buffer reads of an item: when it was buffered, its message's priority."""

    def __init__(self, x: Any, at: float | None = None, priority: int | None = None) -> None:
        self.x, self.buffered_at = x, time.monotonic() if at is None else at
        self.message = _Message({} if priority is None else {"priority": priority})


class _Message:
    def __init__(self, properties: dict[str, Any]) -> None:
        self.properties = properties


def _spec(preferred: Any = None, max_batch_size: int = 8, **options: Any) -> BatchSpec:
    def fn(xs: list[int]) -> list[int]:
        return xs
    return BatchSpec.from_function(fn, skip_first=False, task_name="t",
                                   max_batch_size=max_batch_size, wait_ms=options.pop("wait_ms", 20),
                                   preferred_batch_sizes=preferred, **options)


def _buffer(spec: BatchSpec, busy: list[bool] | None = None, latency: LatencyModel | None = None,
            one_process: bool = False) -> tuple[BatchBuffer, Clock, list]:
    """A buffer whose flushes are recorded; ``busy[0]``: every pool process is busy (with
    ``one_process``, a flush makes it so)."""
    flushed: list[tuple[list[Any], FlushReason]] = []
    clock = Clock()

    def flush(items: list[Any], credit: Any, reason: FlushReason) -> None:
        flushed.append(([it.x for it in items], reason))
        if one_process and busy is not None:
            busy[0] = True

    buffer = BatchBuffer(spec, clock, Credit(), flush,  # type: ignore[arg-type]
                         pool_busy=lambda: bool(busy and busy[0]), latency=latency)
    return buffer, clock, flushed


def test_each_key_is_cut_on_its_own():
    buffer, clock, flushed = _buffer(_spec((2, 4), batch_key=lambda x: x % 2))
    for x in range(7):  # key 0: 0 2 4 6, key 1: 1 3 5
        buffer.put(It(x), x % 2)
    clock.fire()
    assert sorted(flushed) == [([0, 2, 4, 6], FlushReason.WAIT), ([1, 3], FlushReason.PREFERRED)]
    clock.fire()
    assert flushed[-1] == ([5], FlushReason.WAIT) and len(buffer) == 0


def test_the_rest_keeps_its_cost_and_a_cost_flush_is_never_cut():
    buffer, clock, flushed = _buffer(_spec((2, 4), batch_cost=lambda x: x, max_batch_cost=10))
    for x in (1, 1, 1):
        buffer.put(It(x), None, float(x))
    clock.fire()  # 3 items due: 2 leave, 1 (cost 1) stays
    assert flushed == [([1, 1], FlushReason.PREFERRED)]
    buffer.put(It(9), None, 9.0)  # 1 + 9 reaches the bound: flushed whole, not cut
    assert flushed[-1] == ([1, 9], FlushReason.COST) and len(buffer) == 0


def test_a_due_batch_is_cut_when_a_process_frees():
    busy = [True]
    buffer, clock, flushed = _buffer(_spec((4,)), busy=busy)
    for x in range(6):
        buffer.put(It(x))
    clock.fire()  # every process busy: the batch keeps filling
    assert flushed == []
    busy[0] = False
    buffer.flush_if_due()
    assert flushed == [([0, 1, 2, 3], FlushReason.PREFERRED)] and len(buffer) == 2
    clock.fire()
    assert flushed[-1] == ([4, 5], FlushReason.WAIT)


def _latency_buffer(first_at: float) -> tuple[BatchBuffer, Clock, list]:
    latency = LatencyModel(target_ms=1000, max_batch_size=8)
    for k in range(5, 0, -1):  # a fast arrival rate before the first item: worth waiting
        latency.arrived(None, first_at - 0.001 * k)
    return _buffer(_spec((4,), max_latency_ms=1000), latency=latency)


def test_with_a_latency_target_the_rest_waits_only_within_its_own_target():
    now = time.monotonic()
    buffer, clock, flushed = _latency_buffer(now - 0.5)
    for x in range(6):  # 0-3 arrived 0.5 s ago (due in 0.5 s), 4 and 5 just now
        buffer.put(It(x, now - 0.5 if x < 4 else now))
    assert flushed == []
    clock.fire()
    assert flushed == [([0, 1, 2, 3], FlushReason.PREFERRED)] and len(buffer) == 2
    assert 0.5 < clock.entries[-1][0] <= 1.0  # the rest's own deadline: 1 s after item 4

    # Items whose own deadline has passed are never held back: the batch leaves whole.
    buffer, clock, flushed = _latency_buffer(now - 2.0)
    for x in range(6):
        buffer.put(It(x, now - 2.0))
    clock.fire()
    assert flushed == [([0, 1, 2, 3, 4, 5], FlushReason.LATENCY)] and len(buffer) == 0


def test_reconfigure_drops_sizes_above_the_new_max():
    buffer, clock, flushed = _buffer(_spec((2, 8), max_batch_size=8))
    buffer.reconfigure(_spec((2, 8), max_batch_size=8).reconfigured({"max_batch_size": 4}))
    for x in range(3):
        buffer.put(It(x))
    clock.fire()
    assert flushed == [([0, 1], FlushReason.PREFERRED)]
    buffer.reconfigure(buffer.spec.reconfigured({"max_batch_size": 1}))
    assert flushed[-1] == ([2], FlushReason.RECONFIGURED)
