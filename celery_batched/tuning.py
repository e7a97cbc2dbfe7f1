"""The worker's Python interpreter, tuned for the hot path: garbage collector and GIL.

**Start-up heap out of full collections.** After start-up a worker process holds some 70,000
objects that live as long as it does (Celery, kombu, the app, a model loaded in ``setup()``).
Python's full (generation 2) collection traverses every one of them, and under load the hot
path's allocations trigger one every second or two: 20-60 ms pauses measured in the consumer on
2 cores at 10,000 items/s, during which every item in that process waits -- most of the
loaded-latency tail. ``gc.freeze()`` moves what exists at the end of start-up into the permanent
generation once, so later full passes traverse only what was made since. Collection stays on;
frozen objects are still freed by reference counting, only a reference cycle among them would be
kept. ``batching_gc_freeze = False`` in the app's config turns it off.

**A shorter GIL switch interval in the main process, on request.** The result writer thread
encodes a batch's results while the consumer's event loop waits for the GIL -- by default up to
5 ms (``sys.getswitchinterval()``) -- before it can hand the pool its next batch. With JSON
results of 128 vectors (11 ms to encode here) the pool idled that long per batch: a simulated
20 ms model reached 64 % of its limit, 76-83 % with ``batching_switch_interval = 0.0005``
(seconds). With msgpack (5 bytes per float32, ``encoding.py``) it made no measurable difference,
and a drain of tiny tasks lost ~10 % to the extra switching, so it is off unless set (default
None: Python's own). A value the process already changed from Python's default is left alone.
"""

from __future__ import annotations

import gc
import sys

from celery import Celery

from .errors import WorkerConfigurationError

#: CPython's default ``sys.getswitchinterval()``.
PYTHON_DEFAULT_SWITCH_INTERVAL = 0.005

#: True in a worker's processes (set before the pool forks, so its children inherit it): only
#: there does ``setup()`` end with a freeze. An eager or direct call runs ``setup()`` in the
#: caller's process -- a web server, a test run -- whose heap is not ours to freeze.
_in_worker = False


def set_in_worker(value: bool) -> None:
    global _in_worker
    _in_worker = value


def freeze_after_setup(app: Celery) -> None:
    """After a batched task's ``setup()``: freeze what it loaded, in a worker's process only."""
    if _in_worker:
        freeze_startup_heap(app)


def freeze_startup_heap(app: Celery) -> bool:
    """Collect, then freeze what is left (unless the app's ``batching_gc_freeze`` is False).

    Called in the worker's main process while the consumer is assembled (before the pool forks,
    so pool processes inherit it) and again at the end of its first start, and in each pool
    process after a batched task's ``setup()``, so a model loaded there is frozen too; each later
    call collects only what the earlier ones did not freeze.
    """
    if not app.conf.get("batching_gc_freeze", True):
        return False
    gc.collect()
    gc.freeze()
    return True


def shorten_switch_interval(app: Celery) -> float | None:
    """Set this process's GIL switch interval from ``batching_switch_interval``; the interval
    it replaced, or None where it left the interval alone."""
    wanted = app.conf.get("batching_switch_interval")
    if wanted is None:
        return None
    try:
        seconds = float(wanted)
    except (TypeError, ValueError):
        seconds = -1.0
    if isinstance(wanted, bool) or not 0 < seconds <= 1:
        raise WorkerConfigurationError(
            f"celery_batched: batching_switch_interval={wanted!r} is not a GIL switch interval; "
            f"set it to a number of seconds above 0 and at most 1 (0.0005 helps JSON vector "
            f"results), or to None to keep Python's own")
    previous = sys.getswitchinterval()
    if abs(previous - PYTHON_DEFAULT_SWITCH_INTERVAL) > 1e-9:
        return None
    sys.setswitchinterval(seconds)
    return previous


def restore(previous_interval: float | None, froze: bool) -> None:
    """Undo both in a process that goes on after its worker stopped (a worker embedded in a
    test run, ``celery.contrib.testing``)."""
    if previous_interval is not None:
        sys.setswitchinterval(previous_interval)
    if froze:
        gc.unfreeze()
