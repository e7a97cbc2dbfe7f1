"""HTTP front end: ``uvicorn example_project.web:api`` (a worker must serve the ``gpu`` queue).

``POST /add`` ``{"x": 1, "y": 300}`` -> 200 ``{"result": 301}``
``POST /embed`` ``{"text": "..."}`` -> 200 ``{"embedding": [384 floats]}``
``GET /tasks/{task_id}`` -> 200 ``{"task_id": ..., "status": "SUCCESS", "result": ...}`` (and
the item's batch: ``batch_id``, ``batch_size``, ... where the worker stored it, with
``EXAMPLE_RESULT_EXTENDED=1``)
``GET /healthz`` -> 200 while a worker that serves the model answers, else 503

A failed item answers 502 with its ``task_id`` and ``error``; when the function raised for its
whole batch (so a neighbour may be the cause) also ``batch_id`` and ``note`` saying so. A body
over ``EXAMPLE_API_MAX_BODY_BYTES`` (default 64 KiB) answers 413 before it is read to the end.
While the ``gpu`` queue holds the task's ``max_backlog`` messages (``embed``:
``EXAMPLE_EMBED_MAX_BACKLOG``, default 10,000) an item is not sent: 429 with ``Retry-After``,
the seconds the measured drain needs to bring the queue under the bound.

Each request sends ONE item; the worker batches the items of concurrent requests into one call
(three concurrent ``/add`` requests make two ``batch_add`` executions, ``max_batch_size=2``).

How a handler waits without blocking the event loop: sending a task and ``AsyncResult.get`` are
blocking calls (a broker publish, then a wait on the result backend -- a Redis pub/sub
subscription, or polling). The handler runs both in a thread of a dedicated pool
(:func:`call_task`) and awaits that thread's future, so the loop keeps serving other requests
meanwhile and every concurrent request has its item in flight at once -- which is what lets the
worker batch them. Sending and waiting happen in the same thread on purpose: Celery keeps one
result backend (and one result consumer) per thread, and those aren't meant to be shared by
threads waiting at the same time, which is what would happen if the handler sent the task on the
loop's thread and only waited in the pool. The pool has ``EXAMPLE_API_WAITERS`` threads (default
64, at least a batch's worth): requests beyond that wait for a free thread. Polling the backend
with ``asyncio.sleep`` in between would also work, but costs a backend round trip per poll per
request and adds up to one poll interval of latency.

When the result doesn't come in time (``EXAMPLE_API_RESULT_TIMEOUT`` seconds, default 30: no
worker runs, or it is working through a backlog), the request answers **202 Accepted** with the
item's ``task_id`` and ``Location: /tasks/{task_id}``; the item stays queued, runs when a worker
takes it, and ``GET /tasks/{task_id}`` gives its outcome. Not 504: the item is in the queue
already and would run anyway, for a caller who was told it failed. Revoking it at the deadline
isn't exact either: a revoke reaches only the workers running at that moment, and the item may
have just started. So the answers that say "failed" are exact: 502 when the task failed in the
worker (it ran, and failed), 503 when the item couldn't be handed to the broker after Celery's
publish retries (it was not queued, so it never runs).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import os
import re
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from celery import states
from fastapi import FastAPI, HTTPException
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from celery_batched import Backpressure

from .celery_app import QUEUE, app
from .tasks import batch_add, embed

#: Seconds a request waits for its result before answering 202 with the task's id.
RESULT_TIMEOUT = float(os.environ.get("EXAMPLE_API_RESULT_TIMEOUT", "30"))
WAITERS = int(os.environ.get("EXAMPLE_API_WAITERS", "64"))
#: Seconds /healthz waits for workers to answer.
HEALTH_TIMEOUT = float(os.environ.get("EXAMPLE_API_HEALTH_TIMEOUT", "2"))
#: Largest request body accepted; larger ones answer 413 (a 10 MB text would hold a waiter
#: thread and the web process's memory for seconds, and no model reads past 256 tokens).
MAX_BODY_BYTES = int(os.environ.get("EXAMPLE_API_MAX_BODY_BYTES", str(64 * 1024)))
#: The batch fields a stored result meta carries with ``result_extended``.
BATCH_FIELDS = ("batch_id", "batch_size", "flush_reason", "buffer_wait_ms")

_waiters = ThreadPoolExecutor(max_workers=WAITERS, thread_name_prefix="celery-result")

api = FastAPI(title="celery-batched example",
              description="Single items in, batched execution in the worker.")


class BodyLimit:
    """ASGI middleware: 413 for a body over ``limit`` bytes, from its Content-Length or, for a
    chunked body, as soon as the bytes read pass it -- before the whole body is in memory."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or ()).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await self._too_large(send, int(length))
            return
        seen = 0

        async def limited() -> Any:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:  # FastAPI passes an HTTPException raised while reading on
                raise HTTPException(413, self._detail(seen))
            return message

        await self.app(scope, limited, send)

    def _detail(self, size: int) -> str:
        return (f"request body of {size} bytes or more is over this API's limit of "
                f"{self.limit} bytes (EXAMPLE_API_MAX_BODY_BYTES): send one shorter text per "
                f"request")

    async def _too_large(self, send: Any, size: int) -> None:
        response = JSONResponse({"detail": self._detail(size)}, status_code=413)
        await response({"type": "http"}, _no_receive, send)


async def _no_receive() -> Any:
    return {"type": "http.disconnect"}


api.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)


class AddRequest(BaseModel):
    x: int
    y: int


class AddResponse(BaseModel):
    result: int


class EmbedRequest(BaseModel):
    text: str = Field(min_length=1)


class EmbedResponse(BaseModel):
    embedding: list[float]


class Accepted(BaseModel):
    """202: the item is queued; ``GET status_url`` until ``status`` is SUCCESS or FAILURE."""

    task_id: str
    status: str = states.PENDING
    status_url: str


class TaskStatus(BaseModel):
    """One item's state: ``result`` once SUCCESS, ``error`` once FAILURE or REVOKED.

    PENDING also stands for an id Celery has no record of (never sent, or its result expired
    after ``result_expires``, an hour): the result backend can't tell these apart.
    """

    task_id: str
    status: str
    result: Any = None
    error: str | None = None
    #: Where the worker stored the item's batch (``EXAMPLE_RESULT_EXTENDED=1``): ``batch_id``,
    #: ``batch_size``, ``flush_reason``, ``buffer_wait_ms``.
    batch: dict[str, Any] | None = None
    #: celery_batched's note on a failure the function raised for the whole batch.
    note: str | None = None


class Health(BaseModel):
    status: str
    workers: list[str]


_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    202: {"model": Accepted, "description": "no result in time: the item is queued, poll its status_url"},
    413: {"description": "the request body is over EXAMPLE_API_MAX_BODY_BYTES"},
    429: {"description": "the task's queue holds max_backlog messages: retry after the "
                         "Retry-After header's seconds"},
    502: {"description": "the task failed in the worker: detail has task_id, error, and for a "
                         "whole-batch error batch_id and note"},
    503: {"description": "the item could not be sent to the broker: it will not run"},
}


def batch_note(traceback: str | None) -> str | None:
    """celery_batched's note on an error the function raised for several items together (PEP
    678, in the stored traceback), or None: the error may be a neighbour's."""
    notes = [line for line in (traceback or "").splitlines() if line.startswith("celery_batched:")]
    return notes[-1] if notes else None


def _failure(task_name: str, task_id: str, exc: Any, traceback: str | None) -> dict[str, Any]:
    """What a 502 and ``GET /tasks/{id}`` say of a failed item."""
    out: dict[str, Any] = {"task_id": task_id,
                           "error": f"{task_name} failed: {type(exc).__name__}: {exc}"}
    note = batch_note(traceback)
    if note is not None:
        out["note"] = note
        found = re.search(r"batch (\S+) \(\d+ items\)", note)
        if found:
            out["batch_id"] = found.group(1)
    return out


def _send_and_wait(task: Any, args: tuple[Any, ...], timeout: float) -> tuple[str, str | None, Any]:
    """Runs in a waiter thread: send one item and wait up to ``timeout`` for its outcome.

    Returns ``(task_id, state, value)``; ``state`` is None when the outcome is still unknown (no
    result in time, or the result backend unreachable meanwhile: the item is queued either way).
    Raises :class:`HTTPException` 429 (with ``Retry-After``) when the queue is over the task's
    ``max_backlog`` and 503 when sending failed.
    """
    try:
        result = task.delay(*args)
    except Backpressure as exc:  # shed the load: nothing was queued
        raise HTTPException(429, str(exc), headers={
            "Retry-After": str(max(1, math.ceil(exc.retry_after or 1)))}) from None
    except Exception as exc:  # kombu gave up after its publish retries: nothing was queued
        raise HTTPException(503, f"{task.name}: could not send the item to the broker: "
                                 f"{type(exc).__name__}: {exc}") from None
    try:
        value = result.get(timeout=timeout, propagate=False)
    except Exception:  # celery.exceptions.TimeoutError, or a result backend error
        # Stop listening for this id: this thread's result consumer would keep it otherwise.
        with contextlib.suppress(Exception):  # the backend may be unreachable: nothing to undo
            result.backend.remove_pending_result(result)
        return result.id, None, None
    if result.state != states.SUCCESS:
        return result.id, result.state, _failure(task.name, result.id, value, result.traceback)
    return result.id, result.state, value  # state comes from the meta get() just cached


async def call_task(task: Any, *args: Any, timeout: float = RESULT_TIMEOUT) -> Any:
    """Send one item of ``task`` and await its result without blocking the event loop.

    Returns the result, or a 202 :class:`JSONResponse` (:class:`Accepted`) when there was none
    within ``timeout`` seconds. Raises 502 when the task failed and 503 when it couldn't be sent.
    A request cancelled meanwhile (client gone) leaves its thread waiting until the result or the
    timeout; the item runs either way.
    """
    loop = asyncio.get_running_loop()
    task_id, state, value = await loop.run_in_executor(
        _waiters, functools.partial(_send_and_wait, task, args, timeout))
    if state is None:
        status_url = f"/tasks/{task_id}"
        return JSONResponse(Accepted(task_id=task_id, status_url=status_url).model_dump(),
                            status_code=202, headers={"Location": status_url})
    if state != states.SUCCESS:  # FAILURE (or REVOKED): what _failure said of it
        raise HTTPException(502, value)
    return value


@api.post("/add", response_model=AddResponse, responses=_ERROR_RESPONSES)
async def add(body: AddRequest) -> Any:
    result = await call_task(batch_add, body.x, body.y)
    return result if isinstance(result, JSONResponse) else AddResponse(result=result)


@api.post("/embed", response_model=EmbedResponse, responses=_ERROR_RESPONSES)
async def embed_text(body: EmbedRequest) -> Any:
    result = await call_task(embed, body.text)
    return result if isinstance(result, JSONResponse) else EmbedResponse(embedding=result)


def _task_status(task_id: str) -> TaskStatus:
    """Runs in a thread: one read of the item's meta from the result backend."""
    meta = app.backend.get_task_meta(task_id)  # one read: state, result, traceback, batch
    state = meta["status"]
    batch = {k: meta[k] for k in BATCH_FIELDS if meta.get(k) is not None} or None
    if state == states.SUCCESS:
        return TaskStatus(task_id=task_id, status=state, result=meta["result"], batch=batch)
    if state in states.PROPAGATE_STATES:
        exc = meta["result"]
        note = batch_note(meta.get("traceback"))
        return TaskStatus(task_id=task_id, status=state, error=f"{type(exc).__name__}: {exc}",
                          batch=batch, note=note)
    return TaskStatus(task_id=task_id, status=state)


@api.get("/tasks/{task_id}", response_model=TaskStatus)
async def task_status(task_id: uuid.UUID) -> TaskStatus:
    """The outcome of an item a 202 answer named (any item's, given its id)."""
    return await asyncio.get_running_loop().run_in_executor(None, _task_status, str(task_id))


#: The workers the last check found serving the model: asked first, by name.
_last_found: tuple[str, ...] = ()


def workers_with_model(timeout: float = HEALTH_TIMEOUT) -> list[str]:
    """The workers that answer within ``timeout``, consume ``QUEUE`` and run ``embed`` batched.

    The workers found last time are asked by name (``batching_config``), which returns as soon
    as they have all answered: a check takes one round trip while they live. Only when none of
    them answers: ``active_queues`` to everyone (waits the whole timeout, since nobody knows how
    many workers there are), then ``batching_config`` to the workers found.
    """
    global _last_found
    found = _serving_model(list(_last_found), timeout) if _last_found else []
    if not found:
        queues = app.control.inspect(timeout=timeout).active_queues() or {}
        serving = sorted(name for name, consumed in queues.items()
                         if any(q.get("name") == QUEUE for q in consumed))
        found = _serving_model(serving, timeout) if serving else []
    _last_found = tuple(found)
    return found


def _serving_model(workers: list[str], timeout: float) -> list[str]:
    replies = app.control.broadcast("batching_config", reply=True, timeout=timeout,
                                    destination=workers, limit=len(workers)) or []
    return sorted(name for reply in replies for name, tasks in reply.items() if embed.name in tasks)


@api.get("/healthz", response_model=Health, responses={503: {"model": Health}})
async def healthz() -> Any:
    """200 while a worker that serves the model answers; 503 otherwise (and when the broker is
    down), so a load balancer or ``docker compose ps`` shows that requests would only queue."""
    try:
        workers = await asyncio.get_running_loop().run_in_executor(None, workers_with_model)
    except Exception as exc:  # the broker is unreachable
        return JSONResponse(Health(status=f"broker unreachable: {type(exc).__name__}: {exc}",
                                   workers=[]).model_dump(), status_code=503)
    if not workers:
        return JSONResponse(Health(status=f"no worker running {embed.name} on queue {QUEUE!r} "
                                          f"answered within {HEALTH_TIMEOUT:g}s",
                                   workers=[]).model_dump(), status_code=503)
    return Health(status="ok", workers=workers)
