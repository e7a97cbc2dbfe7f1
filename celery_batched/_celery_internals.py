"""Every place celery_batched reaches into Celery or kombu internals, in one module.

Each function says which Celery function it mirrors. Tested with celery 5.5-5.7, kombu 5.5-5.7,
redis-py 5-8. When upgrading Celery, diff the mirrored functions first.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence
from typing import Any

from celery import Task, group, signature, states
from celery.app.task import Context
from celery.backends.base import BaseKeyValueStoreBackend
from celery.exceptions import BackendStoreError, Retry
from celery.utils.time import get_exponential_backoff_interval
from kombu.exceptions import EncodeError
from kombu.utils.encoding import bytes_to_str

_HOSTNAME = socket.gethostname()

try:  # redis is a declared dependency, but any Celery backend must work without it imported.
    from celery.backends.redis import RedisBackend
except ImportError:  # pragma: no cover
    RedisBackend = None


def pool_item(req: Any) -> tuple[str, dict[str, Any], Sequence[Any], dict[str, Any], dict[str, Any] | None]:
    """What the pool needs of one ``celery.worker.request.Request``.

    ``embed`` (callbacks, errbacks, chain, chord) lives in the decoded body, which Request keeps
    in ``_payload``; ``Request.execute_using_pool`` sends the raw body instead (Celery 5.5-5.7).
    """
    # 'properties' repeats fields the dict has on its own (reply_to, correlation_id,
    # delivery_info) and nothing in a task's Context reads it; args/kwargs travel once.
    request = {k: v for k, v in req.request_dict.items() if k not in _NOT_SENT}
    return (req.id, request, req.args, req.kwargs, req._payload[2])


_NOT_SENT = frozenset(("properties", "args", "kwargs"))


def make_context(request_dict: dict[str, Any], args: Sequence[Any], kwargs: dict[str, Any],
                 embed: dict[str, Any] | None, hostname: str | None) -> Context:
    """The ``task.request`` of one item.

    Mirrors ``celery.app.trace.fast_trace_task``'s ``request.update(..., **embed)`` and
    ``build_tracer``'s ``Context(request, args=..., called_directly=False, kwargs=...)``.
    """
    return Context(request_dict, args=args, called_directly=False, kwargs=kwargs,
                   hostname=hostname or request_dict.get("hostname") or _HOSTNAME, is_eager=False,
                   **(embed or {}))


def dispatch_callbacks_and_chain(task: Task, retval: Any, ctx: Context) -> None:
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
    publish = app.amqp._retry_publish
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


def autoretry(task: Task, exc: BaseException) -> BaseException:
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


def request_retry(task: Task, exc: BaseException | None, retry_kwargs: dict[str, Any]) -> BaseException:
    """Re-send the current item through ``Task.retry``; return the ``Retry`` or the final error."""
    try:
        task.retry(exc=exc, **retry_kwargs)
    except Retry as retry:
        return retry
    except BaseException as final:  # max_retries exceeded: Celery re-raises exc or MaxRetriesExceeded
        return final
    raise AssertionError("Task.retry(throw=True) returned")  # pragma: no cover


StoreEntry = tuple[str, Any, Context]  # task_id, value, item context
_ITEM_ERRORS = (EncodeError, TypeError, ValueError, BackendStoreError)


def store_results(task: Task, entries: Sequence[StoreEntry], state: str,
                  on_error: Callable[[int, BaseException], None]) -> None:
    """Store many items' results with as few backend round trips as the backend allows.

    Key-value backends: one ``MGET`` to skip items whose SUCCESS is already stored (the
    duplicate-delivery guard of ``BaseKeyValueStoreBackend._store_result``), then one Redis
    pipeline of ``SET``/``SETEX`` + ``PUBLISH`` per item (``RedisBackend._set``), or one ``set``
    per item on other key-value backends. Other backends (database, rpc, ...) go through
    ``backend.store_result`` one by one. An item whose value can't be encoded is reported through
    ``on_error(index, exc)`` and nothing is stored for it; the rest are stored. Connection errors
    are retried with the backend's retry policy, then raised (the batch's items then fail).
    Mirrors ``BaseKeyValueStoreBackend._store_result`` and ``Backend.store_result``.
    """
    backend = task.backend
    if not entries:
        return
    if not isinstance(backend, BaseKeyValueStoreBackend) or not _has_mget(backend):
        for i, (task_id, value, ctx) in enumerate(entries):
            try:
                backend.store_result(task_id, value, state, request=ctx)
            except _ITEM_ERRORS as exc:  # this item's value; connection errors propagate
                on_error(i, exc)
        return

    keys: list[bytes | str] = []
    values: list[Any] = []
    result_meta = _result_meta_factory(backend, state)
    for i, (task_id, value, ctx) in enumerate(entries):
        try:
            meta = result_meta(backend.encode_result(value, state), ctx)
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
        todo = [(k, v) for k, v, cur in zip(keys, values, current)
                if not (cur and backend.decode_result(cur).get("status") == states.SUCCESS)]
        if RedisBackend is not None and isinstance(backend, RedisBackend):
            expires = backend.expires
            with backend.client.pipeline(transaction=False) as pipe:
                for key, value in todo:
                    if expires:
                        pipe.setex(key, expires, value)
                    else:
                        pipe.set(key, value)
                    pipe.publish(key, value)
                pipe.execute()
        else:
            for key, value in todo:
                backend._set_with_state(key, value, state)

    if RedisBackend is not None and isinstance(backend, RedisBackend):
        backend.ensure(_write, ())  # RedisBackend.set's retries on connection errors
    else:
        backend._ensure_retryable(_write)


def _result_meta_factory(backend: Any, state: str) -> Callable[[Any, Context], dict[str, Any]]:
    """``backend._get_result_meta`` for a whole batch.

    Without ``result_extended`` the meta only varies in result, group and parent: build it
    directly, with one ``date_done`` for the batch (they finish together). Mirrors
    ``celery.backends.base.Backend._get_result_meta`` (Celery 5.5-5.7).
    """
    if backend.app.conf.find_value_for_key("extended", "result"):
        return lambda result, ctx: backend._get_result_meta(result=result, state=state,
                                                            traceback=None, request=ctx)
    date_done = backend.app.now().isoformat() if state in backend.READY_STATES else None

    def meta(result: Any, ctx: Context) -> dict[str, Any]:
        out = {"status": state, "result": result, "traceback": None,
               "children": backend.current_task_children(ctx), "date_done": date_done}
        if getattr(ctx, "group", None):
            out["group_id"] = ctx.group
        if getattr(ctx, "parent_id", None):
            out["parent_id"] = ctx.parent_id
        return out
    return meta


def _has_mget(backend: BaseKeyValueStoreBackend) -> bool:
    return type(backend).mget is not BaseKeyValueStoreBackend.mget


def ignores_result(task: Task, ctx: Context) -> bool:
    """Mirrors ``celery.app.task.get_actual_ignore_result``: the message's flag, else the task's."""
    value = ctx.__dict__.get("ignore_result")
    return bool(task.ignore_result if value is None else value)

