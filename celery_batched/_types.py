"""What the worker path needs of a batched task, as a Protocol.

The worker-side modules (consumer -> buffer -> dispatch -> execution -> writer -> completion)
take a ``BatchedTaskLike`` rather than importing ``task.BatchedTask``: ``task.py`` (what users
import) sits above the worker path and imports from it, never the other way round.
"""

from __future__ import annotations

from typing import Any, Protocol

from .spec import BatchSpec


class BatchedTaskLike(Protocol):
    """The attributes of a ``BatchedTask`` that the worker path reads."""

    name: str
    app: Any
    backend: Any
    request_stack: Any
    request: Any
    acks_late: bool
    ignore_result: bool
    track_started: bool
    send_events: bool
    resultrepr_maxsize: int
    time_limit: float | None
    soft_time_limit: float | None
    isolate_failures: bool
    _batch_spec: BatchSpec

    def setup(self) -> None: ...

    def run(self, *args: Any, **kwargs: Any) -> Any: ...

    def retry(self, *args: Any, **kwargs: Any) -> Any: ...

    def apply_async(self, *args: Any, **kwargs: Any) -> Any: ...

    def on_failure(self, exc: Any, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None: ...

    def on_retry(self, exc: Any, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None: ...
