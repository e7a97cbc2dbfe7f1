"""The event loop a worker process keeps for ``async def`` batched functions.

One loop per process, running in its own daemon thread and created on first use (so after the
prefork pool has forked). Keeping it alive across batches lets an async function hold sessions,
clients or a model server connection between calls; running it in a thread lets any pool thread
submit to it, which a loop owned by one thread would not allow.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Coroutine
from typing import Any

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_loop_pid: int | None = None


def _get_loop() -> asyncio.AbstractEventLoop:
    global _loop, _loop_pid
    pid = os.getpid()
    with _lock:
        if _loop is None or _loop_pid != pid or _loop.is_closed():
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name="celery-batched-loop",
                                      daemon=True)
            thread.start()
            _loop, _loop_pid = loop, pid
        return _loop


def run_coroutine(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run ``coro`` on this process's batching loop and wait for its result."""
    future = asyncio.run_coroutine_threadsafe(coro, _get_loop())
    try:
        return future.result()
    except BaseException:
        # A soft time limit or shutdown interrupts the wait: stop the coroutine too.
        future.cancel()
        raise
