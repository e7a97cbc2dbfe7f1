"""What a batched function may put at an item's position besides a plain result."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class RetryItem:
    """Return this at an item's position to re-send that item alone, as ``Task.retry`` would.

    The item counts one retry against ``max_retries`` (its own count, not the batch's), waits
    ``countdown`` seconds (or until ``eta``) and then joins whatever batch is filling. Past
    ``max_retries`` it fails with ``exc`` (or Celery's ``MaxRetriesExceededError``).

    >>> return [RetryItem(exc=err, countdown=5) if err else vec for err, vec in rows]
    """

    exc: BaseException | None = None
    countdown: float | None = None
    eta: datetime | None = None
    max_retries: int | None = None

    def retry_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        if self.countdown is not None:
            kwargs["countdown"] = self.countdown
        if self.eta is not None:
            kwargs["eta"] = self.eta
        if self.max_retries is not None:
            kwargs["max_retries"] = self.max_retries
        return kwargs
