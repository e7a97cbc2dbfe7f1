"""HTTP front end: ``uvicorn example_project.web:api`` (a worker must serve the ``gpu`` queue).

``POST /add`` ``{"x": 1, "y": 300}`` -> ``{"result": 301}``
``POST /embed`` ``{"text": "..."}`` -> ``{"embedding": [384 floats]}``

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
"""

from __future__ import annotations

import asyncio
import functools
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from celery.exceptions import TimeoutError as CeleryTimeoutError
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, Field

from .tasks import batch_add, embed

#: Seconds a request waits for its result before answering 504.
RESULT_TIMEOUT = float(os.environ.get("EXAMPLE_API_RESULT_TIMEOUT", "30"))
WAITERS = int(os.environ.get("EXAMPLE_API_WAITERS", "64"))

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


def _send_and_wait(task: Any, args: tuple[Any, ...], timeout: float) -> Any:
    """Runs in a waiter thread: send one item, block until its result."""
    return task.delay(*args).get(timeout=timeout)


async def call_task(task: Any, *args: Any, timeout: float = RESULT_TIMEOUT) -> Any:
    """Send one item of ``task`` and await its result without blocking the event loop.

    Raises 504 when no result came within ``timeout`` seconds and 502 when the task failed.
    A request cancelled meanwhile (client gone) leaves its thread waiting until the result or the
    timeout; the task itself runs either way.
    """
    loop = asyncio.get_running_loop()
    try:
        return await loop.run_in_executor(
            _waiters, functools.partial(_send_and_wait, task, args, timeout))
    except CeleryTimeoutError:
        raise HTTPException(504, f"{task.name}: no result within {timeout:g}s") from None
    except Exception as exc:  # the task failed in the worker: its exception is re-raised here
        raise HTTPException(502, f"{task.name} failed: {type(exc).__name__}: {exc}") from None


@api.post("/add", response_model=AddResponse)
async def add(body: AddRequest) -> AddResponse:
    return AddResponse(result=await call_task(batch_add, body.x, body.y))


@api.post("/embed", response_model=EmbedResponse)
async def embed_text(body: EmbedRequest) -> EmbedResponse:
    return EmbedResponse(embedding=await call_task(embed, body.text))
