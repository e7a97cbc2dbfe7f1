"""``urgent_priority``: which items are urgent, and the key their batches wait under.

The broker's own order decides what "at least as urgent" means: RabbitMQ delivers higher
priorities first (a queue with ``x-max-priority``), kombu's Redis transport pops its priority
lists lowest first and gives a message sent without a priority 0. The buffer (``buffer.py``)
keeps urgent items' batches under an ``UrgentKey`` and sends them first to a free process.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .item import Item

#: Urgent batches that may go ahead of a waiting other batch (without taking its items along)
#: before it gets a process: the others are never starved.
MAX_URGENT_IN_A_ROW = 3


class UrgentKey:
    """The key of an urgent item's batch: never equal to any key of the others."""

    __slots__ = ("key",)

    def __init__(self, key: Hashable) -> None:
        self.key = key

    def __hash__(self) -> int:
        return hash((UrgentKey, self.key))

    def __eq__(self, other: object) -> bool:
        return type(other) is UrgentKey and other.key == self.key


def urgency(urgent_priority: int | None, high_first: bool) -> Callable[[Item], bool] | None:
    """Whether an item is urgent, from its message's priority, as the broker orders them:
    higher numbers first (RabbitMQ) or lower first (Redis, where kombu gives a message without
    one priority 0); None when the task has no ``urgent_priority``."""
    if urgent_priority is None:
        return None
    at = urgent_priority

    def is_urgent(item: Item) -> bool:
        priority = (item.message.properties or {}).get("priority")
        if priority is None:
            return False
        return bool(priority >= at if high_first else priority <= at)
    return is_urgent
