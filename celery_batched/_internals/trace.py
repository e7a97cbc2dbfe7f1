"""Pool side: what a batch's process mirrors of Celery's tracer (``celery.app.trace``), its
autoretry wrapper and its result backends, per item of a batch (Celery 5.5-5.7)."""

from __future__ import annotations

import itertools
import logging
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from contextvars import ContextVar
from typing import Any

from billiard.einfo import ExceptionInfo, ExceptionWithTraceback
from celery import group, signals, signature, states
from celery.app.task import Context
from celery.backends.base import BaseKeyValueStoreBackend
from celery.exceptions import BackendStoreError, InvalidTaskError, Retry
from celery.utils.serialization import get_pickleable_etype, get_pickleable_exception
from celery.utils.time import get_exponential_backoff_interval
from kombu.exceptions import EncodeError
from kombu.serialization import loads as kombu_loads
from kombu.utils.encoding import bytes_to_str

from . import jsonc

_HOSTNAME = socket.gethostname()

try:  # redis is a declared dependency, but any Celery backend must work without it imported.
    from celery.backends.redis import RedisBackend
except ImportError:  # pragma: no cover
    RedisBackend = None



def decode_body(body: Any, content_type: str | None, content_encoding: str | None,
                accept: frozenset[str]) -> tuple[Sequence[Any], dict[str, Any], dict[str, Any] | None]:
    """One message body -> ``(args, kwargs, embed)``.

    Mirrors ``kombu.serialization.loads`` (accept check, then the registry's decoder), with one
    JSON decoder kept for the process: ``kombu.utils.json.loads`` builds a new one per call. A
    protocol-1 style body (a dict) is read as ``celery.worker.strategy.hybrid_to_proto2`` does.
    """
    if isinstance(body, tuple):
        return body  # decoded in the consumer (ETA, legacy)
    if content_type == "application/json" and "application/json" in accept:
        decoded = jsonc.loads(body)
    else:
        decoded = kombu_loads(body, content_type, content_encoding, accept=accept)
    return split_body(decoded)


def decode_json_bodies(bodies: Sequence[Any]) -> list[Any] | None:
    """Many JSON message bodies (bytes) decoded in one call, as ``decode_body`` decodes each; None
    when that can't be done safely at once (a body kombu's hook would rewrite, a body that is
    not one JSON value, undecodable text) -- the caller then decodes each alone, so a bad item
    fails alone. One C-level decode of the joined text costs a third of 128 separate ones."""
    if any(b'"__type__"' in body for body in bodies):
        return None
    return jsonc.loads_many(bodies)


def split_body(decoded: Any) -> tuple[Sequence[Any], dict[str, Any], dict[str, Any] | None]:
    """A decoded body -> ``(args, kwargs, embed)`` (protocol 2, or a protocol-1 style dict)."""
    if isinstance(decoded, dict):
        args, kwargs = decoded.get("args", ()), decoded.get("kwargs", {})
        if not isinstance(kwargs, dict):
            raise InvalidTaskError("Task keyword arguments must be a mapping")
        return args, kwargs, {"callbacks": decoded.get("callbacks"),
                              "errbacks": decoded.get("errbacks"), "chord": decoded.get("chord"),
                              "chain": None}
    args, kwargs, embed = decoded
    return args, kwargs, embed


def make_context(headers: dict[str, Any], args: Sequence[Any], kwargs: dict[str, Any],
                 embed: dict[str, Any] | None, delivery: tuple[Any, ...],
                 hostname: str | None) -> Context:
    """The ``task.request`` of one item.

    Mirrors the request dict ``celery.worker.request.Request.__init__`` builds (properties,
    reply_to, correlation_id, hostname, delivery_info) and ``celery.app.trace.fast_trace_task``'s
    ``Context(request, args=..., kwargs=..., **embed)``.
    """
    exchange, routing_key, priority, redelivered, reply_to, correlation_id = delivery
    host = hostname or _HOSTNAME
    return Context(headers, args=args, kwargs=kwargs, called_directly=False, is_eager=False,
                   hostname=host, reply_to=reply_to, correlation_id=correlation_id,
                   delivery_info={"exchange": exchange, "routing_key": routing_key,
                                  "priority": priority, "redelivered": redelivered},
                   **(embed or {}))


def dispatch_callbacks_and_chain(task: Any, retval: Any, ctx: Context) -> None:
    """Send an item's ``link`` callbacks and the next step of its chain.

    Mirrors ``_dispatch_callbacks_and_chain`` inside ``celery.app.trace.build_tracer``.
    """
    app = task.app
    callbacks, chain = ctx.callbacks, ctx.chain
    if not callbacks and not chain:
        return
    task_id = ctx.id
    root_id = ctx.root_id or task_id
    priority = (ctx.delivery_info or {}).get("priority") if app.conf.task_inherit_parent_priority else None
    # Celery >= 5.7 retries a callback's publish on its own (AMQP._retry_publish).
    publish = getattr(app.amqp, "_retry_publish", None) or _publish_once
    if callbacks:
        sigs: list[Any] = []
        groups: list[Any] = []
        for sig in callbacks:
            sig = signature(sig, app=app)
            (groups if isinstance(sig, group) else sigs).append(sig)
        for group_ in groups:
            publish(group_.apply_async, (retval,), parent_id=task_id, root_id=root_id,
                    priority=priority)
        if len(sigs) == 1:
            publish(sigs[0].apply_async, (retval,), parent_id=task_id, root_id=root_id,
                    priority=priority)
        elif sigs:
            publish(group(sigs, app=app).apply_async, (retval,), parent_id=task_id,
                    root_id=root_id, priority=priority)
    if chain:
        next_step = signature(chain[-1], app=app)
        publish(next_step.apply_async, (retval,), chain=chain[:-1], parent_id=task_id,
                root_id=root_id, priority=priority)


def _publish_once(publish: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return publish(*args, **kwargs)


def undecorated_run(task: Any) -> Any:
    """The task's own function: Celery's autoretry wraps ``run`` as a whole and keeps the
    original as ``_orig_run`` (``celery.app.autoretry.add_autoretry_behaviour``, Celery
    5.6-5.7); batched items retry one by one (``autoretry`` below)."""
    return task.__dict__.get("_orig_run") or task.run


def autoretry(task: Any, exc: BaseException) -> BaseException:
    """Apply the task's ``autoretry_for`` policy to one item's exception.

    Returns the :class:`~celery.exceptions.Retry` to record when the item was re-sent, or the
    exception to record as its failure. ``task.request`` must be the item's context.
    Mirrors the wrapper in ``celery.app.autoretry.add_autoretry_behaviour``; Celery's own wrapper
    wraps the whole ``run`` and so would retry a whole batch as one item.
    """
    autoretry_for = tuple(getattr(task, "autoretry_for", ()) or ())
    if not autoretry_for or not isinstance(exc, autoretry_for):
        return exc
    dont = tuple(getattr(task, "dont_autoretry_for", ()) or ())
    if dont and isinstance(exc, dont):
        return exc
    retry_kwargs = dict(getattr(task, "retry_kwargs", {}) or {})
    retry_backoff = float(getattr(task, "retry_backoff", False))
    if retry_backoff:
        retry_kwargs["countdown"] = get_exponential_backoff_interval(
            factor=int(max(1.0, retry_backoff)),
            retries=task.request.retries,
            maximum=int(getattr(task, "retry_backoff_max", 600)),
            full_jitter=getattr(task, "retry_jitter", True))
    return request_retry(task, exc, retry_kwargs)


def request_retry(task: Any, exc: BaseException | None, retry_kwargs: dict[str, Any]) -> BaseException:
    """Re-send the current item through ``Task.retry``; return the ``Retry`` or the final error."""
    try:
        task.retry(exc=exc, **retry_kwargs)
    except Retry as retry:
        return retry
    except BaseException as final:  # max_retries exceeded: Celery re-raises exc or MaxRetriesExceeded
        return final
    raise AssertionError("Task.retry(throw=True) returned")  # pragma: no cover


def exception_info(exc: BaseException) -> ExceptionInfo:
    """A picklable ``ExceptionInfo`` of ``exc`` with its own traceback, without re-raising it
    (re-raising one exception per item grows its traceback by a frame each time).

    Mirrors the start of ``celery.app.trace.TraceInfo.handle_failure``. An exception the
    function returned (never raised) has no traceback: its text is the exception alone.
    """
    pickleable = get_pickleable_exception(exc)
    if pickleable.__traceback__ is None:
        pickleable.__traceback__ = exc.__traceback__
    etype = get_pickleable_etype(type(exc))
    if pickleable.__traceback__ is None:
        return _UnraisedExceptionInfo(etype, pickleable)
    return ExceptionInfo(exc_info=(etype, pickleable, pickleable.__traceback__))


def raw_exception(einfo: ExceptionInfo) -> BaseException:
    """The exception an ``ExceptionInfo`` holds (billiard wraps it in ``ExceptionWithTraceback``)."""
    exc = einfo.exception
    return exc.exc if isinstance(exc, ExceptionWithTraceback) else exc


class _UnraisedExceptionInfo(ExceptionInfo):
    """``billiard.einfo.ExceptionInfo`` of an exception that was never raised (no frames)."""

    def __init__(self, etype: type[BaseException], exc: BaseException) -> None:
        self.type = etype
        self.tb = None
        self.internal = False
        self.traceback = "".join(traceback.format_exception_only(etype, exc))
        self.exception = ExceptionWithTraceback(exc, self.traceback)


def is_outage(exc: BaseException, backend: Any) -> bool:
    """Whether ``exc`` means a server (result backend or broker) did not take a write, as
    opposed to a bad value or a bug: an outage hands the item back to the broker to run again.

    Unreachable (connection errors, the backend's own ``connection_errors``) or refusing writes
    (``refuses_writes``): either way the outcome is not stored, and acknowledging the item would
    leave it PENDING forever.
    """
    from kombu.exceptions import OperationalError

    errors = (ConnectionError, TimeoutError, OSError, OperationalError,
              *tuple(getattr(backend, "connection_errors", ()) or ()))
    if isinstance(exc, BackendStoreError) and exc.__context__ is not None:
        # Backend._ensure_retryable's fallback once its retries ran out (the database
        # backend): the error it gave up on says what happened.
        exc = exc.__context__
    return isinstance(exc, errors) or refuses_writes(exc)


def refuses_writes(exc: BaseException) -> bool:
    """A reachable backend that refuses writes for now: Redis at ``maxmemory`` with
    ``noeviction`` (OOM), a replica after a failover (READONLY), an ACL without write access
    (NOPERM), a failing snapshot (MISCONF), a cluster reconfiguring; a database that refused the
    statement (SQLAlchemy: a read-only transaction, revoked privileges, a lost connection)."""
    redis_errors = sys.modules.get("redis.exceptions")  # not imported: not a Redis error
    if redis_errors is not None and isinstance(exc, redis_errors.ResponseError):
        if isinstance(exc, (redis_errors.ReadOnlyError, redis_errors.OutOfMemoryError,
                            redis_errors.NoPermissionError, redis_errors.TryAgainError,
                            redis_errors.ClusterDownError)):
            return True
        text = str(exc)
        # A write inside a script of a user without write access ("The user executing the
        # script can't run this command or subcommand"): NOPERM, as Redis words it there.
        return (text.startswith(("MISCONF", "LOADING", "MASTERDOWN", "NOREPLICAS"))
                or "can't run this command" in text)
    if isinstance(exc, BackendStoreError) and exc.__context__ is not None:
        exc = exc.__context__  # the database backend's own retries ran out (Celery >= 5.7)
    sqlalchemy = sys.modules.get("sqlalchemy.exc")
    return sqlalchemy is not None and isinstance(exc, sqlalchemy.SQLAlchemyError)


def write_retried(backend: Any, fun: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fun(*args, **kwargs)``, a result-backend write, retried with the backend's
    ``retry_policy`` while the backend refuses writes (``refuses_writes``), after whatever
    retries the backend made itself (the database backend's ``result_backend_max_retries``).

    Connection errors are retried inside Celery's backends already (``RedisBackend.ensure``,
    ``Backend._ensure_retryable``); a refusal is raised at once there, and an item handed back
    at once would be redelivered and run again at once, in a loop for as long as the refusal
    lasts. Mirrors the schedule of ``kombu.utils.functional.retry_over_time`` as
    ``RedisBackend.ensure`` calls it.
    """
    from kombu.utils.functional import fxrange

    policy = dict(getattr(backend, "retry_policy", None) or {})
    max_retries = policy.get("max_retries") or 0
    start, interval_max = policy.get("interval_start", 0), float(policy.get("interval_max", 1))
    intervals = fxrange(start, interval_max + start, policy.get("interval_step", 1),
                        repeatlast=True)
    for retries in itertools.count():
        try:
            return fun(*args, **kwargs)
        except Exception as exc:
            if retries >= max_retries or not refuses_writes(exc):
                raise
            pause = min(next(intervals), interval_max)
            logging.getLogger(__name__).warning(
                "celery_batched: the result backend refused a write (%s: %s); retrying in "
                "%.1fs (%d of %d)", type(exc).__name__, exc, pause, retries + 1, max_retries)
            time.sleep(pause)
    raise AssertionError("unreachable")  # pragma: no cover


def store_errors_for(task: Any, ctx: Context) -> bool:
    """Mirrors ``TraceInfo.handle_error_state``'s ``store_errors`` for a worker (not eager) run."""
    return bool(task.store_errors_even_if_ignored) if ignores_result(task, ctx) else True


def failure_hooks(task: Any, ctx: Context, einfo: ExceptionInfo) -> None:
    """``on_failure`` and ``task_failure`` for one item whose failure is stored.

    Mirrors the end of ``celery.app.trace.TraceInfo.handle_failure`` (after
    ``backend.mark_as_failure``) except its per-task error log: the batch logs one line, and one
    traceback, for all its failed items. A raising hook is logged and the failure stands.
    """
    exc = raw_exception(einfo)
    try:
        task.on_failure(exc, ctx.id, ctx.args, ctx.kwargs, einfo)
        if signals.task_failure.receivers:
            signals.task_failure.send(sender=task, task_id=ctx.id, exception=exc, args=ctx.args,
                                      kwargs=ctx.kwargs, traceback=exc.__traceback__, einfo=einfo)
    except Exception:
        logging.getLogger(__name__).exception("%s[%s]: on_failure or a task_failure receiver raised",
                                              task.name, ctx.id)


def record_retry(task: Any, ctx: Context, reason: Retry) -> ExceptionInfo:
    """Store one item's RETRY state, run ``on_retry`` and ``task_retry``.

    Mirrors ``celery.app.trace.TraceInfo.handle_retry`` except its per-task INFO log line.
    """
    einfo = ExceptionInfo((type(reason), reason, reason.__traceback__))
    if store_errors_for(task, ctx):
        try:
            write_retried(task.backend, task.backend.mark_as_retry, ctx.id, reason.exc,
                          einfo.traceback, request=ctx)
        except Exception as exc:
            if not is_outage(exc, task.backend):
                raise
            # The retry message is on the broker already and carries the item on: handing the
            # original back too would add a copy per pass (a retry storm during an outage).
            logging.getLogger(__name__).warning(
                "%s[%s]: sent for retry; its RETRY state could not be stored (%s: %s)",
                task.name, ctx.id, type(exc).__name__, exc)
    task.on_retry(reason.exc, ctx.id, ctx.args, ctx.kwargs, einfo)
    if signals.task_retry.receivers:
        signals.task_retry.send(sender=task, request=ctx, reason=reason, einfo=einfo)
    return einfo


StoreEntry = tuple[str, Any, Context]  # task_id, value, item context
_ITEM_ERRORS = (EncodeError, TypeError, ValueError, BackendStoreError)


def store_results(task: Any, entries: Sequence[StoreEntry], state: str,
                  on_error: Callable[[int, BaseException], None]) -> None:
    """Store many items' results (``STARTED``, or ``SUCCESS`` where the pool must store them).

    Key-value backends: one ``MGET`` to skip items whose SUCCESS is already stored (the guard of
    ``BaseKeyValueStoreBackend._store_result``), then one Redis pipeline of ``SET``/``SETEX`` +
    ``PUBLISH`` per item (``RedisBackend._set``), or one ``set`` per item elsewhere. Other
    backends go through ``backend.store_result``. An item whose value can't be encoded goes to
    ``on_error(index, exc)``; connection errors are retried with the backend's policy, then raised.
    Mirrors ``BaseKeyValueStoreBackend._store_result`` and ``Backend.store_result``.
    """
    backend = task.backend
    if not entries:
        return
    if not isinstance(backend, BaseKeyValueStoreBackend) or not _has_mget(backend):
        for i, (task_id, value, ctx) in enumerate(entries):
            try:
                write_retried(backend, backend.store_result, task_id, value, state, request=ctx)
            except _ITEM_ERRORS as exc:  # this item's value; connection errors propagate
                if is_outage(exc, backend):
                    raise
                on_error(i, exc)
        return
    keys: list[Any] = []
    values: list[Any] = []
    for i, (task_id, value, ctx) in enumerate(entries):
        try:
            meta = backend._get_result_meta(result=backend.encode_result(value, state),
                                            state=state, traceback=None, request=ctx)
            meta["task_id"] = bytes_to_str(task_id)
            encoded = backend.encode(meta)
        except Exception as exc:
            on_error(i, exc)
            continue
        keys.append(backend.get_key_for_task(task_id))
        values.append(encoded)
    if not keys:
        return

    def _write() -> None:
        current = backend.mget(keys)
        if isinstance(current, dict):  # CacheBackend.mget (memcached, cache+memory): by key
            current = [current.get(k) for k in keys]
        todo = [(k, v) for k, v, cur in zip(keys, values, current)
                if not (cur and backend.decode_result(cur).get("status") == states.SUCCESS)]
        if RedisBackend is not None and isinstance(backend, RedisBackend):
            with backend.client.pipeline(transaction=False) as pipe:
                for key, value in todo:
                    if backend.expires:
                        pipe.set(key, value, ex=backend.expires)
                    else:
                        pipe.set(key, value)
                    pipe.publish(key, value)
                pipe.execute()
        else:
            for key, value in todo:
                backend._set_with_state(key, value, state)

    if RedisBackend is not None and isinstance(backend, RedisBackend):
        # RedisBackend.set's retries on connection errors
        write_retried(backend, backend.ensure, _write, ())
    else:
        write_retried(backend, backend._ensure_retryable, _write)


def _has_mget(backend: BaseKeyValueStoreBackend) -> bool:
    return type(backend).mget is not BaseKeyValueStoreBackend.mget


def ignores_result(task: Any, ctx: Any) -> bool:
    """Mirrors ``celery.app.task.get_actual_ignore_result``: the message's flag, else the task's."""
    value = ctx.get("ignore_result") if isinstance(ctx, dict) else ctx.__dict__.get("ignore_result")
    return bool(task.ignore_result if value is None else value)


def has_success_hooks(task: Any) -> bool:
    """Whether anything runs after an item succeeds: the hooks Celery's tracer calls."""
    from celery.app.trace import task_has_custom

    return bool(task_has_custom(task, "on_success") or task_has_custom(task, "after_return")
                or signals.task_success.receivers or signals.task_postrun.receivers)


def run_success_hooks(task: Any, ctx: Context, retval: Any, runtime: float) -> None:
    """What Celery's tracer runs after an ordinary task succeeds and its result is stored.

    Mirrors ``celery.app.trace.build_tracer`` (``on_success``, ``task_success``,
    ``after_return``, ``task_postrun``). A failing hook is logged, like Celery's tracer.
    """
    from celery.app.trace import task_has_custom

    task.request_stack.push(ctx)
    try:
        if task_has_custom(task, "on_success"):
            task.on_success(retval, ctx.id, ctx.args, ctx.kwargs)
        if signals.task_success.receivers:
            signals.task_success.send(sender=task, result=retval, runtime=runtime)
        if task_has_custom(task, "after_return"):
            task.after_return(states.SUCCESS, retval, ctx.id, ctx.args, ctx.kwargs, None)
        if signals.task_postrun.receivers:
            signals.task_postrun.send(sender=task, task_id=ctx.id, task=task, args=ctx.args,
                                      kwargs=ctx.kwargs, retval=retval, state=states.SUCCESS)
    finally:
        task.request_stack.pop()


def announce_prerun(task: Any, contexts: Iterable[Context]) -> None:
    """``task_prerun`` per item, as ``celery.app.trace.build_tracer`` sends it."""
    for ctx in contexts:
        task.request_stack.push(ctx)
        try:
            signals.task_prerun.send(sender=task, task_id=ctx.id, task=task, args=ctx.args,
                                     kwargs=ctx.kwargs)
        finally:
            task.request_stack.pop()


#: ``result_extended``: per task id, the batch fields its stored metas carry (this batch only).
_batch_meta: ContextVar[dict[str, dict[str, Any]] | None] = ContextVar("batch_meta", default=None)


def set_batch_meta(fields: dict[str, dict[str, Any]] | None) -> Any:
    """Batch fields for the metas the current batch stores; returns the token to reset."""
    return _batch_meta.set(fields)


def reset_batch_meta(token: Any) -> None:
    _batch_meta.reset(token)


def add_batch_meta(backend: Any) -> None:
    """With ``result_extended``, every meta this backend stores for an item of a batch -- SUCCESS,
    FAILURE, RETRY, STARTED, by this package or by Celery's own failure handling -- carries the
    item's batch fields. Wraps ``Backend._get_result_meta`` (Celery 5.6-5.7: called with
    ``request=`` by ``_store_result`` of every backend), once per backend instance."""
    if backend.__dict__.get("_celery_batched_meta"):
        return
    original = backend._get_result_meta

    def _get_result_meta(*args: Any, **kwargs: Any) -> Any:
        meta = original(*args, **kwargs)
        fields = _batch_meta.get()
        if fields:
            request = kwargs.get("request", args[3] if len(args) > 3 else None)
            extra = fields.get(getattr(request, "id", None) or "")
            if extra:
                meta.update(extra)
        return meta

    backend._get_result_meta = _get_result_meta
    backend.__dict__["_celery_batched_meta"] = True
