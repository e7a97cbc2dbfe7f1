"""Ask running workers how their batches went (the ``batching_stats`` remote-control command)."""

from __future__ import annotations

from typing import Any

from celery import Celery


def batching_stats(app: Celery, timeout: float = 1.0,
                   destination: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """``{worker: {task: {"batches", "items", "batch_sizes", "buffered", "held"}}}``.

    Same data as ``celery -A proj inspect batching_stats``; Celery's ``Inspect`` object has no
    method for a command registered by a library, so this sends it by name.
    """
    replies = app.control.broadcast("batching_stats", reply=True, timeout=timeout,
                                    destination=destination,
                                    limit=len(destination) if destination else None) or []
    out: dict[str, dict[str, Any]] = {}
    for reply in replies:
        out.update(reply)
    return out
