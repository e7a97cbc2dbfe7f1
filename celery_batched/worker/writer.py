"""Results, stored while the next batch runs: a writer thread in the worker's main process.

The pool returns a batch's successful values (``Outcome.STORE`` items) as soon as the function
returns,
and is free for the next batch; this thread encodes the batch's metas at once (``encoding.py``)
and stores them in one round trip (``redis_results.py``), then hands the batch to the consumer's
thread for the acknowledgements (``completion.py``). Acks only ever follow a stored result:
an item whose result could not be stored -- the backend stayed unreachable past its retry
policy -- is handed back to the broker (``Outcome.UNSTORED``) and runs again later.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .._internals import redis_results, trace
from ..encoding import MetaEncoder, bounded_repr, plain
from ..errors import ItemResultEncodeError
from ..protocol import BatchedTaskLike, BatchReply, Outcome
from .in_flight import InFlight

if TYPE_CHECKING:
    from .batch import Batch
    from .item import Item

logger = logging.getLogger(__name__)

#: Per ``Outcome.STORE`` item, what became of it: ``(DONE, repr or None)``, ``(FAILED,
#: ExceptionInfo)`` or ``(UNSTORED, reason)``.
Written = list[tuple[Outcome, Any]]


class ResultWriter:
    """One thread that stores the batches' successes, in the order they finished."""

    def __init__(self, on_written: Callable[[Batch, BatchReply, Written], None]) -> None:
        #: Where each stored batch goes: to the consumer's thread, for its acks.
        self.on_written = on_written
        self._queue: queue.SimpleQueue[tuple[Batch, BatchReply] | None] = queue.SimpleQueue()
        self._in_flight = InFlight()
        self._encoders: dict[int, MetaEncoder] = {}
        self._thread = threading.Thread(target=self._run, name="celery-batched-writer", daemon=True)
        self._thread.start()

    def submit(self, batch: Batch, reply: BatchReply) -> None:
        self._in_flight.started()
        self._queue.put((batch, reply))

    @property
    def pending(self) -> int:
        return self._in_flight.count

    def drain(self, timeout: float) -> bool:
        """Wait until every submitted batch is written (or ``timeout``); True if all were."""
        return self._in_flight.wait_idle(timeout)

    def stop(self) -> None:
        self._queue.put(None)

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            batch, reply = job
            try:
                written = self.write(batch, reply)
            except Exception as exc:  # never lose the batch: hand it back rather than ack it
                logger.exception("celery_batched: writing batch %s failed", batch.id)
                written = [(Outcome.UNSTORED, f"{type(exc).__name__}: {exc}")] * \
                    reply.codes.count(Outcome.STORE)
            try:
                self.on_written(batch, reply, written)
            finally:
                self._in_flight.finished()

    def write(self, batch: Batch, reply: BatchReply) -> Written:
        """Encode and store the batch's ``STORE`` items; what became of each."""
        task = batch.task
        backend = task.backend  # this thread's own backend instance (Celery's are thread-local)
        index = [i for i, code in enumerate(reply.codes) if code == Outcome.STORE]
        items = [batch.items[i] for i in index]
        values = reply.values
        encoder = self._encoders.get(id(backend))
        if encoder is None:
            encoder = self._encoders[id(backend)] = MetaEncoder(backend)
        bad: dict[int, BaseException] = {}
        metas = encoder.encode([it.id for it in items], [it.headers for it in items], values,
                               backend.app.now().isoformat(), bad.__setitem__)
        keep = [k for k in range(len(items)) if k not in bad]
        written: Written = [(Outcome.DONE, None)] * len(items)
        try:
            redis_results.store(backend, [items[k].id for k in keep], [metas[k] for k in keep])
        except Exception as exc:
            if not trace.is_outage(exc, backend):
                # Not the backend's state: a bug, or a reply we don't know. Celery's own path,
                # per item, tells the items apart.
                logger.warning("celery_batched: storing batch %s in one call failed (%s: %s); "
                               "storing its results one by one", batch.id,
                               type(exc).__name__, exc)
                for k in keep:
                    written[k] = self._store_one(task, items[k], plain(values[k]),
                                                 reply.extras.get(index[k]))
            else:
                logger.error("celery_batched: batch %s of %s: the results of %d item(s) could "
                             "not be stored (%s: %s); they go back to the broker and run again",
                             batch.id, task.name, len(keep), type(exc).__name__, exc)
                # The unencodable ones too: their failures can't be stored now either.
                return [(Outcome.UNSTORED, f"{type(exc).__name__}: {exc}")] * len(items)
        if batch.want_repr:
            maxsize = task.resultrepr_maxsize
            for k in keep:
                if written[k][0] == Outcome.DONE:
                    written[k] = (Outcome.DONE, bounded_repr(plain(values[k]), maxsize))
        for k, cause in bad.items():
            written[k] = self._fail_unencodable(task, items[k], reply.extras.get(index[k]), cause)
        return written

    def _store_one(self, task: BatchedTaskLike, item: Item, value: Any, embed: Any) -> tuple[Outcome, Any]:
        ctx = trace.make_context(item.headers, (), {}, embed, (None,) * 6, None)
        try:
            trace.write_retried(task.backend, task.backend.store_result, item.id, value,
                                "SUCCESS", request=ctx)
        except Exception as exc:
            if trace.is_outage(exc, task.backend):
                return (Outcome.UNSTORED, f"{type(exc).__name__}: {exc}")
            return self._fail_unencodable(task, item, embed, exc)
        return (Outcome.DONE, None)

    def _fail_unencodable(self, task: BatchedTaskLike, item: Item, embed: Any,
                          cause: BaseException) -> tuple[Outcome, Any]:
        """A result the serializer can't encode fails its item alone (errbacks included)."""
        exc = ItemResultEncodeError(
            f"{task.name}: the result for this item could not be stored: "
            f"{type(cause).__name__}: {cause}. Return a value the result serializer "
            f"({task.backend.serializer}) can encode.")
        einfo = trace.exception_info(exc)
        ctx = trace.make_context(item.headers, (), {}, embed, (None,) * 6, None)
        try:
            trace.write_retried(task.backend, task.backend.mark_as_failure, item.id, exc,
                                einfo.traceback, request=ctx, call_errbacks=True)
        except Exception as store_exc:
            if not trace.is_outage(store_exc, task.backend):
                logger.exception("celery_batched: %s[%s]: storing its failure raised",
                                 task.name, item.id)
            return (Outcome.UNSTORED, f"{type(store_exc).__name__}: {store_exc}")
        trace.failure_hooks(task, ctx, einfo)
        return (Outcome.FAILED, einfo)
