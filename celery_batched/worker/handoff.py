"""Run callbacks on the consumer's thread: acks, events and buffer state stay single-threaded.

A batch finishes on another thread (a pool thread with ``-P threads``, the result writer), but
acknowledgements must go through the consumer's channel on the consumer's thread. With an event
loop, callbacks are queued and the loop is woken through a pipe it watches (kombu's own
``Hub.call_soon`` only wakes the loop from kombu 5.7 on). At shutdown the loop stops polling
before the last acks: what is queued runs from ``Hub.close`` (``hub.on_close``), which Celery
calls after the pool has stopped and before the broker connection closes. A pool callback still
queued then hands its batch to the result writer, whose completion (the acks) queues another
callback: ``settle`` alternates the two until neither has work left. A reconnect resets the
loop (``Hub.reset`` also calls ``on_close``): queued callbacks run then, and ``arm`` registers
the pipe again when the consumer restarts.

Transports without an event loop (Celery's ``synloop``: the filesystem transport, SQS) run
callbacks from other threads on one runner thread, under a lock shared with the consumer's
message handler; the acks go to the consumer's thread with Celery's own ``Consumer.call_soon``.
The pool's threads only queue: the consumer may hold the lock while billiard's ``apply_async``
waits for a free process, which only the pool's result thread can announce.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from .._internals import blueprint
from .in_flight import InFlight

logger = logging.getLogger(__name__)


class ConsumerThread:
    """Schedules callbacks onto the consumer's thread (created on that thread)."""

    def __init__(self, consumer: Any, lock: Any) -> None:
        self.consumer = consumer
        self.hub = consumer.hub
        self.ident = threading.get_ident()
        #: Held while the consumer handles a message and while a callback runs (no event loop).
        self.lock = lock
        self._pending: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()
        self._pending_lock = threading.Lock()
        self._signalled = False
        self._drain_at_close: tuple[Callable[[float], bool], float] | None = None
        self._rfd = self._wfd = -1
        self._queued: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...]] | None] = \
            queue.SimpleQueue()
        self._in_flight = InFlight()
        if self.hub is None:
            threading.Thread(target=self._run_queued, name="celery-batched-callbacks",
                             daemon=True).start()
        else:
            self._rfd, self._wfd = os.pipe()
            os.set_blocking(self._rfd, False)
            os.set_blocking(self._wfd, False)
            self.hub.on_close.add(self._on_hub_close)
            self.arm()

    def arm(self) -> None:
        """Watch the wake-up pipe (again, after a reconnect reset the event loop)."""
        if self.hub is not None and self._rfd >= 0:
            self.hub.add_reader(self._rfd, self._on_readable)

    @property
    def has_loop(self) -> bool:
        return self.hub is not None

    def call(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on the consumer's thread: now if this is it, else soon."""
        if self.hub is None:
            if threading.get_ident() == self.ident:
                with self.lock:
                    _run(fn, args)
            else:
                self._in_flight.started()
                self._queued.put((fn, args))
            return
        if threading.get_ident() == self.ident:
            _run(fn, args)
            return
        with self._pending_lock:
            self._pending.append((fn, args))
            wake, self._signalled = not self._signalled, True
        if wake:
            try:
                os.write(self._wfd, b"\0")
            except (BlockingIOError, OSError):  # full (it's already readable) or closed
                pass

    def call_ack(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run an ack or reject on the consumer's thread, also without an event loop."""
        if self.hub is None and threading.get_ident() != self.ident:
            self.consumer.call_soon(fn, *args)
        else:
            fn(*args)

    def drain_at_close(self, drain: Callable[[float], bool], timeout: float) -> None:
        """When the worker's event loop closes for good: ``settle(drain, timeout)``."""
        self._drain_at_close = (drain, timeout)

    def settle(self, drain: Callable[[float], bool], timeout: float) -> bool:
        """The worker is stopping and its pool has stopped: run the callbacks still queued and
        ``drain(seconds)`` -- wait for the work they handed on (the result writer), whose
        completions queue more callbacks; True if it all finished -- in turn, until neither has
        work left or ``timeout`` s have passed. True if everything ran."""
        deadline = time.monotonic() + timeout
        while True:
            self._run_queued_by(deadline)
            try:
                drained = drain(max(0.0, deadline - time.monotonic()))
            except Exception:
                logger.exception("celery_batched: %r raised while the worker stopped", drain)
                drained = False
            if not self._has_queued():
                return drained
            if not drained or time.monotonic() >= deadline:
                self._run_queued_by(deadline)  # what did finish is still acknowledged
                return False

    def _run_queued_by(self, deadline: float) -> None:
        if self.hub is None:  # the runner thread runs them
            self._in_flight.wait_idle(max(0.0, deadline - time.monotonic()))
        else:
            self.run_pending()

    def _has_queued(self) -> bool:
        if self.hub is None:
            return self._in_flight.count > 0
        with self._pending_lock:
            return bool(self._pending)

    def _run_queued(self) -> None:
        while True:
            job = self._queued.get()
            if job is None:
                return
            fn, args = job
            try:
                with self.lock:
                    _run(fn, args)
            finally:
                self._in_flight.finished()

    def run_pending(self) -> None:
        with self._pending_lock:
            todo, self._pending = self._pending, deque()
            self._signalled = False
        for fn, args in todo:
            _run(fn, args)

    def _on_readable(self) -> None:
        try:
            while os.read(self._rfd, 4096):
                pass
        except (BlockingIOError, OSError):
            pass
        self.run_pending()

    def _on_hub_close(self, hub: Any) -> None:
        if not blueprint.worker_stopping(self.consumer):
            self.run_pending()  # a reconnect resets the loop: the worker goes on
            return
        drain, timeout = self._drain_at_close or ((lambda _: True), 0.0)
        self.settle(drain, timeout)
        self.close(closing_hub=True)

    def close(self, closing_hub: bool = False) -> None:
        """``closing_hub``: called from the hub's own ``on_close`` loop, whose set must not
        change under it (kombu 5.6 iterates the set itself; it is dropped with the hub)."""
        if self.hub is None:
            self._queued.put(None)
        if self._rfd >= 0:
            if self.hub is not None:
                try:
                    self.hub.remove_reader(self._rfd)
                except Exception:
                    pass
                if not closing_hub:
                    self.hub.on_close.discard(self._on_hub_close)
            for fd in (self._rfd, self._wfd):
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._rfd = self._wfd = -1


def _run(fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    # Pool callbacks' errors are swallowed by billiard: log them here.
    try:
        fn(*args)
    except Exception:
        logger.exception("celery_batched: %s raised on the consumer thread",
                         getattr(fn, "__qualname__", fn))
