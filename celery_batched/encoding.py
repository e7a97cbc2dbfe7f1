"""Encoding a batch's results for the result backend, and bounded reprs for task events.

Celery encodes one meta dict per task. For a batch, every meta shares all but its result and ids,
so for the ``json`` and ``msgpack`` result serializers the shared parts are encoded once per
batch and each item's encoded result and ids are spliced in; the bytes decode to the very dict
``Backend._get_result_meta`` builds (``status``, ``result``, ``traceback``, ``children``,
``date_done``, ``task_id``, ``group_id``, ``parent_id``). Other serializers encode a dict per item.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from celery.result import ResultBase
from kombu.utils.json import JSONEncoder

_json = JSONEncoder()  # kombu.utils.json.dumps builds this same encoder on every call
_json_str = json.encoder.encode_basestring_ascii


def plain(value: Any) -> Any:
    """A NumPy scalar or array as the Python value it stands for (``.tolist()``); else as is.

    Lets a function return ``list(model.encode(texts))`` (a list of arrays) under JSON.
    """
    if type(value).__module__ == "numpy" and hasattr(value, "tolist"):
        return value.tolist()
    return value


def as_python_rows(values: Any) -> list[Any]:
    """A batch's values as a list of plain Python values (one ``.tolist()`` for an array)."""
    if isinstance(values, list):
        return [plain(v) for v in values]
    return values.tolist()


def msgpack_float_rows(values: Any) -> list[bytes] | None:
    """Each row of a 2-D float array in msgpack, all rows at once; decodes to ``row.tolist()``.

    A row of ``d`` floats is an array header and ``d`` fixed-size records, laid out by NumPy for
    the whole batch in one pass instead of ``d`` Python floats per row. float16/float32 values
    are written as msgpack's 32-bit floats (``0xca`` and 4 big-endian bytes), which hold them
    exactly -- half the bytes of msgpack's default 64-bit records to copy, send and keep in Redis;
    wider floats as ``0xcb`` and 8 bytes, as ``msgpack.packb(row.tolist())`` writes them. None for
    anything else (ints, 1-D, objects).
    """
    import numpy as np

    if values.ndim != 2 or values.dtype.kind != "f":
        return None
    n, d = values.shape
    marker, width = (0xCA, 4) if values.dtype.itemsize <= 4 else (0xCB, 8)
    records = np.empty((n, d), dtype=[("marker", "u1"), ("value", f">f{width}")])
    records["marker"] = marker
    records["value"] = values
    if d <= 15:
        header = bytes((0x90 | d,))
    elif d < 1 << 16:
        header = b"\xdc" + d.to_bytes(2, "big")
    else:
        header = b"\xdd" + d.to_bytes(4, "big")
    raw, size = records.tobytes(), (1 + width) * d
    return [header + raw[k * size:(k + 1) * size] for k in range(n)]


class MetaEncoder:
    """Encodes SUCCESS metas for one result backend, a batch at a time."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.serializer = backend.serializer
        # Celery >= 5.7 compresses the encoded meta (result_compression) in Backend.encode.
        self.compression = getattr(backend, "compression", None)
        if self.serializer == "msgpack":
            import msgpack  # present: the backend itself needs it to encode

            self._packb: Callable[[Any], bytes] = lambda v: msgpack.packb(v, use_bin_type=True)
            # The meta's keys and constant values, packed once: per item only the result and
            # the ids are packed (date_done once per batch).
            p = self._packb
            self._mp_head = p("status") + p("SUCCESS") + p("result")
            self._mp_tail = p("traceback") + p(None) + p("children") + p([]) + p("date_done")
            self._mp_ids = (p("task_id"), p("group_id"), p("parent_id"))
            self._mp_date: tuple[str, bytes] = ("", b"")

    def encode(self, task_ids: Sequence[str], headers: Sequence[dict[str, Any]],
               values: Any, date_done: str,
               on_error: Callable[[int, BaseException], None]) -> list[Any]:
        """One encoded meta per item (``None`` where ``on_error(index, exc)`` was called).

        ``values``: a list, or an array with one row per item.
        """
        if not isinstance(values, list):
            packed = msgpack_float_rows(values) if self.serializer == "msgpack" else None
            values = packed if packed is not None else as_python_rows(values)
            if packed is not None:
                values = [_Packed(v) for v in packed]
        else:
            values = as_python_rows(values)
        encode_one = {"json": self._json_meta, "msgpack": self._msgpack_meta}.get(
            self.serializer, self._dict_meta)
        if self.compression:
            encode_one = self._compressed(encode_one)
        out: list[Any] = []
        for i, (task_id, h, value) in enumerate(zip(task_ids, headers, values)):
            try:
                if isinstance(value, ResultBase):  # Backend.prepare_value turns these into tuples
                    out.append(self._dict_meta(task_id, h, value, date_done))
                else:
                    out.append(encode_one(task_id, h, value, date_done))
            except Exception as exc:
                on_error(i, exc)
                out.append(None)
        return out

    def _compressed(self, encode_one: Callable[..., Any]) -> Callable[..., Any]:
        from celery.backends.base import compress_payload

        def encode(task_id: str, headers: dict[str, Any], value: Any, date_done: str) -> Any:
            payload = encode_one(task_id, headers, value, date_done)
            if isinstance(payload, str):
                payload = payload.encode()
            return compress_payload(payload, self.compression)
        return encode

    def _json_meta(self, task_id: str, headers: dict[str, Any], value: Any, date_done: str) -> str:
        parts = ['{"status": "SUCCESS", "result": ', _json.encode(value),
                 ', "traceback": null, "children": [], "date_done": ', _json_str(date_done),
                 ', "task_id": ', _json_str(task_id)]
        group, parent = headers.get("group"), headers.get("parent_id")
        if group:
            parts += (', "group_id": ', _json.encode(group))
        if parent:
            parts += (', "parent_id": ', _json.encode(parent))
        parts.append("}")
        return "".join(parts)

    def _msgpack_meta(self, task_id: str, headers: dict[str, Any], value: Any,
                      date_done: str) -> bytes:
        pack = self._packb
        if self._mp_date[0] != date_done:
            self._mp_date = (date_done, pack(date_done))
        task_key, group_key, parent_key = self._mp_ids
        group, parent = headers.get("group"), headers.get("parent_id")
        n = 6 + bool(group) + bool(parent)
        packed = value.data if type(value) is _Packed else pack(value)
        parts = [bytes((0x80 | n,)), self._mp_head, packed, self._mp_tail, self._mp_date[1],
                 task_key, pack(task_id)]
        if group:
            parts += (group_key, pack(group))
        if parent:
            parts += (parent_key, pack(parent))
        return b"".join(parts)

    def _dict_meta(self, task_id: str, headers: dict[str, Any], value: Any, date_done: str) -> Any:
        """``Backend.encode`` of the meta dict (compression included, where configured)."""
        backend = self.backend
        meta = {"status": "SUCCESS", "result": backend.encode_result(value, "SUCCESS"),
                "traceback": None, "children": [], "date_done": date_done, "task_id": task_id}
        if headers.get("group"):
            meta["group_id"] = headers["group"]
        if headers.get("parent_id"):
            meta["parent_id"] = headers["parent_id"]
        return backend.encode(meta)


class _Packed:
    """A value already in msgpack form (``msgpack_float_rows``)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


_SCALARS = (int, float, bool, type(None))


def bounded_repr(value: Any, maxsize: int) -> str:
    """``repr`` cut at about ``maxsize`` characters, at the cost of what it shows.

    Celery's ``saferepr`` walks the whole value; for a 384-float vector that was most of a
    batch's time in the pool. A flat list or tuple of scalars (the common result) is rendered
    element by element and stops once ``maxsize`` is reached.
    """
    if isinstance(value, (list, tuple)) and len(value) > 8:
        open_, close = ("[", "]") if isinstance(value, list) else ("(", ")")
        out: list[str] = []
        size = 1
        for v in value:
            if type(v) not in _SCALARS and not (type(v) is str and len(v) < 64):
                break
            text = repr(v)
            size += len(text) + 2
            if size > maxsize:
                return open_ + ", ".join(out) + ", ..." + close
            out.append(text)
        else:
            return open_ + ", ".join(out) + close
    from celery.utils.saferepr import saferepr

    return saferepr(value, maxsize)
