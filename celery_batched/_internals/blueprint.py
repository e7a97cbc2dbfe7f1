"""Adding a step to a consumer whose blueprint was built (and maybe started) without it.

Mirrors the bookkeeping of ``celery.bootsteps.Blueprint.start`` / ``stop`` / ``send_all``
(Celery 5.5-5.7): the steps a blueprint starts, stops and shuts down are ``parent.steps`` in
order; ``stop`` stops them only when ``started == len(parent.steps)``; a step added to
``blueprint.steps`` is found by name. Also how a step tells a worker's shutdown from a reconnect.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ContextManager, Protocol, TypeVar

from celery import bootsteps
from celery.worker import state


class _Startable(Protocol):
    name: str

    def start(self, parent: Any) -> None: ...


S = TypeVar("S", bound=_Startable)


def attach_step(c: Any, make_step: Callable[[Any], S],
                on_running: Callable[[S], None]) -> S | None:
    """Add ``make_step(c)`` to consumer ``c``'s steps just before the event loop's step, where a
    blueprint built with it has it, so the worker's stop and shutdown and a reconnect's restart
    reach it like any other step; None where it can't be (not a Celery consumer, or one that is
    stopping).

    A blueprint that is still starting starts the step in order. One already in its event loop
    can't: ``on_running(step)`` is then called for the caller to start it on the consumer's
    thread later (see ``StartOnEntry``).
    """
    blueprint = getattr(c, "blueprint", None)
    steps = getattr(c, "steps", None)
    if (blueprint is None or not isinstance(steps, list)
            or blueprint.state in (bootsteps.CLOSE, bootsteps.TERMINATE)):
        return None
    at = len(steps) - 1 if steps and getattr(steps[-1], "last", False) else len(steps)
    running = blueprint.state == bootsteps.RUN and blueprint.started == len(steps)
    step = make_step(c)
    if running:
        on_running(step)
        # Blueprint.start is iterating the old list (it is in the event loop's step): a new
        # list keeps it from running that step again when the loop returns.
        c.steps = [*steps[:at], step, *steps[at:]]
        blueprint.started += 1  # Blueprint.stop stops the steps only when all started
    else:
        steps.insert(at, step)
    blueprint.steps.setdefault(step.name, step)
    return step


class StartOnEntry:
    """A lock whose first entry, on the consumer's thread, starts a step attached to a running
    consumer; then every entry takes the lock."""

    def __init__(self, step: _Startable, consumer: Any, lock: ContextManager[Any],
                 started: Callable[[], bool]) -> None:
        self.step, self.consumer, self.lock, self.started = step, consumer, lock, started

    def __enter__(self) -> Any:
        if not self.started():
            self.step.start(self.consumer)
        return self.lock.__enter__()

    def __exit__(self, *exc: Any) -> Any:
        return self.lock.__exit__(*exc)


def worker_stopping(consumer: Any) -> bool:
    """The worker is shutting down (not a reconnect resetting the event loop).

    Mirrors ``celery.worker.state.should_stop``/``should_terminate`` as the worker's
    ``maybe_shutdown`` reads them, and the worker blueprint's ``CLOSE``/``TERMINATE`` states.
    """
    blueprint = getattr(getattr(consumer, "controller", None), "blueprint", None)
    return bool(state.should_stop is not None and state.should_stop is not False
                or state.should_terminate is not None and state.should_terminate is not False
                or (blueprint is not None
                    and blueprint.state in (bootsteps.CLOSE, bootsteps.TERMINATE)))
