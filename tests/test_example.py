"""example_project end to end: ``embed`` through a real worker, the HTTP API, and the demo.

The worker and this process both point example_project at the test Redis (db 11) through
CELERY_BROKER_URL / CELERY_RESULT_BACKEND; Celery reads those variables whenever it connects.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import httpx
import numpy as np
import pytest

import celery_batched

from .workers import ROOT, Worker

REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/11")  # as conftest's
ENV = {"CELERY_BROKER_URL": REDIS_URL, "CELERY_RESULT_BACKEND": REDIS_URL,
       "CELERY_BROKER_TRANSPORT_OPTIONS": "{}"}
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "A fast auburn fox leaps above a sleepy hound.",
    "Quarterly revenue grew by twelve percent.",
    "How do I reset my password?",
    "Photosynthesis turns sunlight into chemical energy.",
    "Ich habe heute keine Zeit.",
]


@pytest.fixture
def example_app(monkeypatch: pytest.MonkeyPatch, redis_client: Any) -> Iterator[Any]:
    """example_project's app, pointed at the (flushed) test Redis in this process."""
    for key, value in ENV.items():
        monkeypatch.setenv(key, value)
    from example_project import app, config_from_env

    app.conf.update(config_from_env())
    assert app.conf.broker_url == REDIS_URL and app.conf.result_backend == REDIS_URL
    yield app


@pytest.fixture(scope="module")
def model() -> Any:
    """The model itself, loaded in this process: what the worker's results must match."""
    from example_project.model import load_model

    return load_model()


@pytest.fixture
def worker(example_app: Any, start_worker: Any) -> Worker:
    return start_worker("example_project", queues="gpu", pool="prefork", concurrency=1, env=ENV)


def batching_stats(app: Any, worker: Worker) -> dict[str, Any]:
    replies = celery_batched.batching_stats(app, timeout=10, destination=[worker.hostname])
    assert replies, "no batching_stats reply from the worker"
    return replies[worker.hostname]  # type: ignore[no-any-return]


def cosine(u: Sequence[float], v: Sequence[float]) -> float:
    a, b = np.asarray(u, dtype=np.float64), np.asarray(v, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def assert_same_vectors(got: Sequence[Sequence[float]], expected: Sequence[Sequence[float]]) -> None:
    """Every vector is 384-d, unit length, and matches its own text's vector, no other's."""
    g, e = np.asarray(got, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert g.shape == e.shape == (len(expected), 384)
    np.testing.assert_allclose(np.linalg.norm(g, axis=1), 1.0, atol=1e-4)
    sims = (g / np.linalg.norm(g, axis=1, keepdims=True)) @ (e / np.linalg.norm(e, axis=1, keepdims=True)).T
    own = np.diag(sims)
    assert own.min() > 0.999, f"item {int(own.argmin())}: cosine {own.min()} with the direct model call"
    assert (sims.argmax(axis=1) == np.arange(len(got))).all(), "an item got another item's vector"


def test_embed_through_a_worker_matches_the_model_and_batches(example_app: Any, worker: Worker,
                                                              model: Any) -> None:
    from example_project.demo import make_sentences
    from example_project.model import encode
    from example_project.tasks import embed

    assert embed.delay(TEXTS[0]).get(timeout=120) is not None  # the first batch loads the model

    texts = TEXTS + make_sentences(90)
    results = [embed.delay(text) for text in texts]  # sent at once
    vectors = [r.get(timeout=120) for r in results]

    assert_same_vectors(vectors, encode(model, texts))
    stats = batching_stats(example_app, worker)["example_project.embed"]
    sizes = {size: n for size, n in stats["batch_sizes"]}
    assert stats["items"] == 1 + len(texts)
    assert max(sizes) > 1 and max(sizes) <= 32, sizes
    assert stats["batches"] < len(texts) // 4, sizes  # 96 items sent at once: mostly full batches


def test_http_api_batches_concurrent_requests(example_app: Any, worker: Worker, model: Any) -> None:
    from example_project.model import encode
    from example_project.web import api

    async def scenario() -> tuple[list[httpx.Response], httpx.Response, int]:
        ticks = 0

        async def ticker() -> None:  # runs only while the handlers leave the loop free
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        tick_task = asyncio.create_task(ticker())
        transport = httpx.ASGITransport(app=api)
        async with httpx.AsyncClient(transport=transport, base_url="http://example") as client:
            adds = await asyncio.gather(*(client.post("/add", json={"x": x, "y": y})
                                          for x, y in [(1, 300), (2, 200), (3, 100)]))
            add_ticks = ticks
            embedded = await client.post("/embed", json={"text": TEXTS[2]})
        tick_task.cancel()
        return adds, embedded, add_ticks

    started = time.monotonic()
    adds, embedded, ticks = asyncio.run(scenario())

    assert [r.status_code for r in adds] == [200, 200, 200], [r.text for r in adds]
    assert [r.json() for r in adds] == [{"result": 301}, {"result": 202}, {"result": 103}]
    # The lone third item waits wait_ms=1000 in the worker; the loop kept ticking meanwhile.
    assert ticks >= 30, f"the event loop was blocked: {ticks} ticks of 10 ms"
    stats = batching_stats(example_app, worker)["example_project.batch_add"]
    assert stats["batches"] == 2 and stats["batch_sizes"] == [[1, 1], [2, 1]], stats
    ran = re.findall(r"batch_add ran on xs=(\[[^\]]*\]) ys=(\[[^\]]*\])", worker.log())
    assert len(ran) == 2 and sorted(len(json.loads(xs)) for xs, _ in ran) == [1, 2], ran

    assert embedded.status_code == 200, embedded.text
    vector = embedded.json()["embedding"]
    assert len(vector) == 384
    assert cosine(vector, encode(model, [TEXTS[2]])[0]) > 0.999
    assert time.monotonic() - started < 120


def test_demo_runs_end_to_end_without_a_server() -> None:
    env = {k: v for k, v in os.environ.items()
           if k not in ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND", "CELERY_BROKER_TRANSPORT_OPTIONS")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "example_project.demo", "--sentences", "64", "--one-by-one", "16"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    elapsed = time.monotonic() - started
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr

    assert "filesystem-atomic://" in out
    assert "batch_add ran on xs=[1, 2] ys=[300, 200]" in out
    assert "batch_add ran on xs=[3] ys=[100]" in out
    assert "2 executions for 3 items" in out
    for line in ("1 + 300 = 301", "2 + 200 = 202", "3 + 100 = 103"):
        assert line in out
    batches = re.search(r"batches embed ran: (\d+) for 64 sentences", out)
    assert batches and int(batches.group(1)) < 64, out  # batched: fewer calls than items
    assert re.search(r"embed .*64/64 in [\d.]+s = [\d,]+ items/s", out), out
    assert re.search(r"embed_one .*16/16 in [\d.]+s = [\d,]+ items/s", out), out
    assert "stopped (exit status 0)" in out
    assert elapsed < 120, f"the demo took {elapsed:.0f}s"


def test_bad_items_fail_alone_and_the_api_says_what_and_where(example_app: Any,
                                                              start_worker: Any) -> None:
    """Issue 19: a bad input fails alone with its own error, the others of its batch succeed;
    GET /tasks/{id} names the item's batch (result_extended); oversized bodies get 413; a
    second /healthz asks the worker it found by name."""
    from example_project.tasks import batch_add, embed
    from example_project.web import api

    worker = start_worker("example_project", queues="gpu", pool="prefork", concurrency=1,
                          env={**ENV, "EXAMPLE_RESULT_EXTENDED": "1"})
    texts: list[Any] = ["a valid text", 3, "   ", "another valid text"]
    results = [embed.delay(t) for t in texts]  # sent together: one batch of 4
    outcomes = [r.get(timeout=120, propagate=False) for r in results]
    assert [len(v) for v in outcomes[::3]] == [384, 384]
    assert isinstance(outcomes[1], TypeError) and str(outcomes[1]) == \
        "embed takes a text (str), got int: 3"
    assert isinstance(outcomes[2], ValueError) and "empty or blank" in str(outcomes[2])
    assert "celery_batched:" not in (results[1].traceback or "")  # its own error, no note
    added = [batch_add.delay(*xy) for xy in (("a", 1), (1, 2))]
    assert isinstance(added[0].get(timeout=30, propagate=False), TypeError)
    assert added[1].get(timeout=30) == 3

    async def scenario() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=api)
        async with httpx.AsyncClient(transport=transport, base_url="http://example") as client:
            return [await client.get(f"/tasks/{results[1].id}"),
                    await client.get(f"/tasks/{results[0].id}"),
                    await client.post("/embed", json={"text": "x" * 200_000}),
                    await client.get("/healthz"), await client.get("/healthz")]

    failed, succeeded, too_large, health, again = asyncio.run(scenario())
    body = failed.json()
    assert body["status"] == "FAILURE" and body["error"].startswith("TypeError: embed takes"), body
    assert body["batch"]["batch_size"] == 4 and body["batch"]["batch_id"].startswith(
        f"{worker.hostname}:"), body
    assert succeeded.json()["batch"]["batch_id"] == body["batch"]["batch_id"]
    assert too_large.status_code == 413 and "EXAMPLE_API_MAX_BODY_BYTES" in too_large.text
    assert health.json()["workers"] == again.json()["workers"] == [worker.hostname]


def test_api_502_names_the_item_and_the_batch_that_raised(redis_client: Any, queue: str,
                                                          start_worker: Any) -> None:
    """A whole-batch error reaches the API's caller with the item's id, the batch's id and the
    note saying another item may have caused it."""
    from fastapi import HTTPException

    from example_project.web import call_task

    from .apps import monitoring

    start_worker("tests.apps.monitoring", queues=queue)
    strict = monitoring.strict.s().set(queue=queue)

    class Routed:  # call_task sends with .delay(); this one goes to the test's queue
        name = monitoring.strict.name

        @staticmethod
        def delay(*args: Any) -> Any:
            return strict.delay(*args)

    async def both() -> list[Any]:
        return await asyncio.gather(call_task(Routed, "fine", timeout=15),
                                    call_task(Routed, 3, timeout=15), return_exceptions=True)

    innocent, culprit = asyncio.run(both())
    for err in (innocent, culprit):
        assert isinstance(err, HTTPException) and err.status_code == 502, err
    detail = innocent.detail
    assert detail["error"] == f"{monitoring.strict.name} failed: ValueError: Unsupported input " \
                              f"type: int", detail
    assert re.fullmatch(r"[0-9a-f-]{36}", detail["task_id"])
    assert detail["batch_id"] in detail["note"] and "another item may have caused it" in \
        detail["note"], detail
    assert culprit.detail["batch_id"] == detail["batch_id"]


def test_api_sheds_load_with_429_and_retry_after(example_app: Any, redis_client: Any,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Past embed's max_backlog the API sends nothing and answers 429 with Retry-After (no
    worker runs: the queue only grows)."""
    from example_project.tasks import embed
    from example_project.web import api

    monkeypatch.setattr(type(embed), "max_backlog", 3)
    embed.map_items(["one", "two", "three"])
    assert redis_client.llen("gpu") == 3

    async def post() -> httpx.Response:
        transport = httpx.ASGITransport(app=api)
        async with httpx.AsyncClient(transport=transport, base_url="http://example") as client:
            return await client.post("/embed", json={"text": "four"})

    shed = asyncio.run(post())
    assert shed.status_code == 429, shed.text
    assert int(shed.headers["Retry-After"]) >= 1
    assert "queue 'gpu' holds 3 messages, and max_backlog is 3" in shed.json()["detail"]
    assert redis_client.llen("gpu") == 3  # nothing was sent
