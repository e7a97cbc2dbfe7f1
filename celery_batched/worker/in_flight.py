"""Jobs handed to a worker thread and not finished yet: the count a shutdown waits on."""

from __future__ import annotations

import threading


class InFlight:
    """A thread-safe count of unfinished jobs, with a wait until there are none."""

    def __init__(self) -> None:
        self._count = 0
        self._idle = threading.Condition()

    @property
    def count(self) -> int:
        return self._count

    def started(self) -> None:
        with self._idle:
            self._count += 1

    def finished(self) -> None:
        with self._idle:
            self._count -= 1
            self._idle.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until every started job has finished, at most ``timeout`` s; True if they have."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._count, timeout)
