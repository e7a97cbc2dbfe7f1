"""Batch fields on each item's events, and where Celery's event consumers show them.

Every item's ``task-started``/``task-succeeded``/``task-failed``/``task-retried`` event carries
which batch it ran in (``BATCH_FIELDS``). Celery's own ``Request`` sends the failed and retried
events; ``BatchEventer`` adds the fields there (it stands in for ``Request._eventer``, used only
by ``Request.send_event``, Celery 5.6-5.7).

``celery.events.state.Task`` -- the event state Flower and ``celery events`` build -- keeps unknown
event fields as attributes but lists only ``Task._fields`` (Flower's task page, ``as_dict``,
the API) and ``Task._info_fields`` (``celery events``). ``register_batch_fields`` adds the batch
fields to both, with class defaults of ``None`` so tasks that were never batched serialize as
before and Flower hides the rows (it skips ``None``).
"""

from __future__ import annotations

from typing import Any

#: The fields an item's events carry about its batch.
BATCH_FIELDS = ("batch_id", "batch_size", "buffer_wait_ms", "flush_reason", "batch_runtime_s")


class BatchEventer:
    """An event dispatcher that adds one item's batch fields to what ``Request`` sends."""

    __slots__ = ("_eventer", "_fields")

    def __init__(self, eventer: Any, fields: dict[str, Any]) -> None:
        self._eventer = eventer
        self._fields = fields

    @property
    def enabled(self) -> bool:
        return bool(self._eventer.enabled)

    def send(self, type: str, **fields: Any) -> Any:
        # Celery's own fields win over ours where both name one (``runtime``, say).
        return self._eventer.send(type, **{**self._fields, **fields})

    def __getattr__(self, name: str) -> Any:
        return getattr(self._eventer, name)


def register_batch_fields() -> None:
    """Teach ``celery.events.state.Task`` (Flower, ``celery events``) the batch fields."""
    from celery.events.state import Task

    for name in BATCH_FIELDS:
        if name not in Task.__dict__:
            setattr(Task, name, None)
    missing = tuple(f for f in BATCH_FIELDS if f not in Task._fields)
    if missing:
        Task._fields = Task._fields + missing
    info_missing = tuple(f for f in BATCH_FIELDS if f not in Task._info_fields)
    if info_missing:
        Task._info_fields = Task._info_fields + info_missing
