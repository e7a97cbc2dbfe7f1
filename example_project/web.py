"""HTTP front end: ``uvicorn example_project.web:api`` (a worker must serve the ``gpu`` queue).

``POST /add`` ``{"x": 1, "y": 300}`` -> 200 ``{"result": 301}``
``POST /embed`` ``{"text": "..."}`` -> 200 ``{"embedding": [384 floats]}``
``GET /tasks/{task_id}`` -> 200 ``{"task_id": ..., "status": "SUCCESS", "result": ...}``
``GET /healthz`` -> 200 while a worker that serves the model answers, else 503

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
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from celery import states
from celery.result import AsyncResult
from fastapi import FastAPI, HTTPException
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from .celery_app import QUEUE, app
from .tasks import batch_add, embed

#: Seconds a request waits for its result before answering 202 with the task's id.
RESULT_TIMEOUT = float(os.environ.get("EXAMPLE_API_RESULT_TIMEOUT", "30"))
WAITERS = int(os.environ.get("EXAMPLE_API_WAITERS", "64"))
#: Seconds /healthz waits for workers to answer.
HEALTH_TIMEOUT = float(os.environ.get("EXAMPLE_API_HEALTH_TIMEOUT", "2"))

_waiters = ThreadPoolExecutor(max_workers=WAITERS, thread_name_prefix="celery-result")

api = FastAPI(title="celery-batched example",
              description="Single items in, batched execution in the worker.")


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


class Health(BaseModel):
    status: str
    workers: list[str]


_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    202: {"model": Accepted, "description": "no result in time: the item is queued, poll its status_url"},
    502: {"description": "the task failed in the worker"},
    503: {"description": "the item could not be sent to the broker: it will not run"},
}


def _send_and_wait(task: Any, args: tuple[Any, ...], timeout: float) -> tuple[str, str | None, Any]:
    """Runs in a waiter thread: send one item and wait up to ``timeout`` for its outcome.

    Returns ``(task_id, state, value)``; ``state`` is None when the outcome is still unknown (no
    result in time, or the result backend unreachable meanwhile: the item is queued either way).
    Raises :class:`HTTPException` 503 when sending failed.
    """
    try:
        result = task.delay(*args)
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
    if state != states.SUCCESS:  # FAILURE (or REVOKED): get() returned the exception
        raise HTTPException(502, f"{task.name} failed: {type(value).__name__}: {value}")
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
    result = AsyncResult(task_id, app=app)
    state = result.state
    if state == states.SUCCESS:
        return TaskStatus(task_id=task_id, status=state, result=result.result)
    if state in states.PROPAGATE_STATES:
        exc = result.result
        return TaskStatus(task_id=task_id, status=state, error=f"{type(exc).__name__}: {exc}")
    return TaskStatus(task_id=task_id, status=state)


@api.get("/tasks/{task_id}", response_model=TaskStatus)
async def task_status(task_id: uuid.UUID) -> TaskStatus:
    """The outcome of an item a 202 answer named (any item's, given its id)."""
    return await asyncio.get_running_loop().run_in_executor(None, _task_status, str(task_id))


def workers_with_model(timeout: float = HEALTH_TIMEOUT) -> list[str]:
    """The workers that answer within ``timeout``, consume ``QUEUE`` and run ``embed`` batched.

    Two broadcasts: ``active_queues`` to everyone (waits the whole timeout, since nobody knows how
    many workers there are), then celery_batched's ``batching_config`` to the workers found, which
    returns as soon as they have all answered.
    """
    queues = app.control.inspect(timeout=timeout).active_queues() or {}
    serving = sorted(name for name, consumed in queues.items()
                     if any(q.get("name") == QUEUE for q in consumed))
    if not serving:
        return []
    replies = app.control.broadcast("batching_config", reply=True, timeout=timeout,
                                    destination=serving, limit=len(serving)) or []
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
