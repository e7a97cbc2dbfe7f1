"""JSON decoding on the hot path: what ``kombu.utils.json.loads`` returns, for less CPU.

kombu builds a new decoder per call and runs its Python ``object_hook`` on every dict; the hook
only changes dicts that kombu's encoder marked with ``"__type__"``, so text without that marker
skips it. With the ``fast`` extra (orjson) installed, unmarked text is decoded by orjson -- about
twice as fast on task messages -- except where orjson's result could differ from the standard
library's: integers or digit runs of 19 digits or more (orjson reads integers beyond 64 bits as
floats), and anything orjson refuses (``NaN``, lone surrogates, deep nesting), which the
standard library then decodes as kombu would.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from kombu.utils.json import object_hook

_plain = json.JSONDecoder().decode
_hooked = json.JSONDecoder(object_hook=object_hook).decode
#: Every digit to ``0``, everything else to a space: a run of 19 digits is then a plain
#: substring search (a regular expression costs 20 times more on task messages).
_DIGITS_AS_ZERO = bytes(48 if 48 <= i <= 57 else 32 for i in range(256))
_LONG_RUN = b"0" * 19

_fast: Callable[[bytes], Any] | None
try:
    import orjson

    _fast = orjson.loads
except ImportError:  # pragma: no cover - the fast extra is optional
    _fast = None


def loads(data: bytes | str) -> Any:
    """One JSON text (UTF-8 bytes or str), decoded as ``kombu.utils.json.loads`` decodes it."""
    if isinstance(data, str):
        text, raw = data, None
    else:
        text, raw = None, data
    if _fast is not None and raw is not None and b'"__type__"' not in raw \
            and _LONG_RUN not in raw.translate(_DIGITS_AS_ZERO):
        try:
            return _fast(raw)
        except ValueError:  # orjson.JSONDecodeError: let the standard library decide
            pass
    if text is None:
        assert raw is not None
        text = raw.decode("utf-8")
    return _hooked(text) if '"__type__"' in text else _plain(text)


def loads_many(texts: Sequence[bytes]) -> list[Any] | None:
    """Many JSON texts decoded in one call of ``loads`` over their joined text (a third of the CPU
    of one call each); None if any is not one JSON value or the whole can't be decoded, so that
    the caller decodes each alone and a bad one fails alone."""
    try:
        decoded = loads(b"[%s]" % b",".join(texts))
    except (ValueError, TypeError):  # UnicodeDecodeError included
        return None
    # A text such as ``1, 2`` would shift every later one: only one value per text counts.
    return decoded if len(decoded) == len(texts) else None


def fast_enabled() -> bool:
    """Whether orjson decodes unmarked text (the ``fast`` extra is installed)."""
    return _fast is not None
