"""Batching policies beyond size and wait: which items may share a batch, and what a batch costs.

* ``batch_key`` -- items with different keys never share a batch (one model per batch, or
  sequence-length buckets). The name of a parameter, or a function called with one item's
  arguments, as the caller passed them to ``.delay()``.
* ``batch_cost`` + ``max_batch_cost`` -- a batch is bounded by its items' total cost (tokens,
  pixels) as well as by their count.
* ``max_latency_ms`` -- a latency target instead of a fixed wait (``latency.py``).
* ``oom_errors`` -- the exceptions on which a batch is split in halves and re-run
  (``execution.py``).
* ``preferred_batch_sizes`` -- the sizes the function runs best at (CUDA graphs, TensorRT
  engines built for fixed shapes): a batch flushed by time leaves at one of them when it can
  (``buffer.py``), and ``padded_size`` tells the function the size to pad to.
* ``urgent_priority`` + ``urgent_wait_ms`` -- items sent with an urgent message priority batch
  apart, with their own wait, and go first to a free pool process (``buffer.py``).

Everything is checked once, when the task is defined, so a mistake fails at import with a
message naming the option; per item, ``ItemPolicy`` evaluates the key and the cost on the
consumer, where the buffer needs them.
"""

from __future__ import annotations

import bisect
import importlib.util
import inspect
import math
import sys
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, Final, TypeGuard

from .errors import BatchedTaskDefinitionError, BatchedTaskOptionError, ItemPolicyError

DEFAULT_MAX_OPEN_KEYS: Final = 64

#: ``oom_errors``' default: ``MemoryError`` and, when torch is installed,
#: ``torch.cuda.OutOfMemoryError`` (matched by name, so torch is never imported for it).
DEFAULT_OOM_ERRORS: Final = "default"
_TORCH_OOM = ("torch.cuda", "OutOfMemoryError")


@dataclass(frozen=True)
class ItemPolicy:
    """Per item: its batch key and its cost, from the arguments bound to the parameters."""

    task_name: str
    param_names: tuple[str, ...]
    n_positional: int
    key_fn: Callable[..., Any] | None
    key_param: int | None
    key_label: str
    cost_fn: Callable[..., Any] | None
    cost_label: str

    @property
    def key_name(self) -> str | None:
        """The key parameter's name or the key function's, for ``inspect batching_config``."""
        if self.key_param is not None:
            return self.param_names[self.key_param]
        if self.key_fn is not None:
            return _name(self.key_fn)
        return None

    def key(self, row: tuple[Any, ...]) -> Hashable:
        if self.key_param is not None:
            key = row[self.key_param]
        elif self.key_fn is not None:
            key = self._call(self.key_fn, row, self.key_label)
        else:
            return None
        try:
            hash(key)
        except TypeError:
            raise ItemPolicyError(
                f"{self.task_name}: {self.key_label} gave this item the key {_short(key)}, which "
                f"is unhashable ({type(key).__name__}); a key must be hashable, e.g. a str, "
                f"an int or a tuple") from None
        return key

    def cost(self, row: tuple[Any, ...]) -> float:
        if self.cost_fn is None:
            return 0.0
        cost = self._call(self.cost_fn, row, self.cost_label)
        if not _finite_non_negative(cost):
            raise ItemPolicyError(
                f"{self.task_name}: {self.cost_label} returned {_short(cost)} for this item; "
                f"a cost must be a finite number >= 0")
        return float(cost)

    def _call(self, fn: Callable[..., Any], row: tuple[Any, ...], label: str) -> Any:
        n = self.n_positional
        try:
            return fn(*row[:n], **dict(zip(self.param_names[n:], row[n:])))
        except Exception as exc:
            raise ItemPolicyError(
                f"{self.task_name}: {label} raised {type(exc).__name__} for this item: {exc}; "
                f"the item was not run") from exc


def item_policy(task_name: str, param_names: tuple[str, ...], n_positional: int,
                batch_key: object, batch_cost: object) -> ItemPolicy | None:
    """The per-item policy of a task, or None when it batches items regardless of their args."""
    if batch_key is None and batch_cost is None:
        return None
    key_fn, key_param, key_label = None, None, "batch_key"
    if isinstance(batch_key, str):
        if batch_key not in param_names:
            raise BatchedTaskDefinitionError(
                f"{task_name}: batch_key={batch_key!r} names no parameter of the function; "
                f"its parameters are ({', '.join(param_names)}). Name one, or pass a function "
                f"of one item's arguments")
        key_param = param_names.index(batch_key)
        key_label = f"batch_key={batch_key!r}"
    elif batch_key is not None:
        key_fn = _check_callable(batch_key, "batch_key", task_name, param_names, n_positional)
        key_label = f"batch_key ({_name(batch_key)})"
    cost_fn = None
    if batch_cost is not None:
        cost_fn = _check_callable(batch_cost, "batch_cost", task_name, param_names, n_positional)
    return ItemPolicy(task_name, param_names, n_positional, key_fn, key_param, key_label,
                      cost_fn, f"batch_cost ({_name(batch_cost)})")


def _check_callable(fn: object, option: str, task_name: str, param_names: tuple[str, ...],
                    n_positional: int) -> Callable[..., Any]:
    if not callable(fn):
        raise BatchedTaskDefinitionError(
            f"{task_name}: {option} must be a function of one item's arguments"
            f"{' or the name of a parameter' if option == 'batch_key' else ''}, got {fn!r} "
            f"({type(fn).__name__})")
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return fn  # a builtin without a readable signature: it will tell per item
    positional = param_names[:n_positional]
    keywords = {name: None for name in param_names[n_positional:]}
    try:
        sig.bind(*positional, **keywords)
    except TypeError as exc:
        raise BatchedTaskDefinitionError(
            f"{task_name}: {option} is called with one item's arguments, like the task itself "
            f"({', '.join(positional)}{', *, ' if keywords else ''}{', '.join(keywords)}), "
            f"but its signature {sig} can't take them: {exc}") from None
    return fn


def check_max_open_keys(value: object, task_name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BatchedTaskOptionError(
            f"{task_name}: max_open_keys must be an int >= 1 (how many keys may have items "
            f"waiting at once), got {value!r}")
    return value


def check_cost_bound(batch_cost: object, max_batch_cost: object, task_name: str) -> float | None:
    if (batch_cost is None) != (max_batch_cost is None):
        given, missing = (("batch_cost", "max_batch_cost") if max_batch_cost is None
                          else ("max_batch_cost", "batch_cost"))
        raise BatchedTaskOptionError(
            f"{task_name}: {given} needs {missing} too: a batch is bounded by the sum of "
            f"batch_cost(item) over its items, at most max_batch_cost")
    if max_batch_cost is None:
        return None
    if isinstance(max_batch_cost, bool) or not isinstance(max_batch_cost, (int, float)) \
            or not max_batch_cost > 0 or math.isinf(max_batch_cost):
        raise BatchedTaskOptionError(
            f"{task_name}: max_batch_cost must be a finite number > 0, got {max_batch_cost!r}")
    return float(max_batch_cost)


def check_max_latency_ms(value: object, wait_ms_set: bool, task_name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 \
            or math.isinf(value):
        raise BatchedTaskOptionError(
            f"{task_name}: max_latency_ms must be a finite number of milliseconds > 0, got "
            f"{value!r}")
    if wait_ms_set:
        raise BatchedTaskOptionError(
            f"{task_name}: set wait_ms or max_latency_ms, not both: with max_latency_ms the "
            f"buffer chooses each wait itself, from the arrival rate and the batch execution "
            f"time it observes")
    return float(value)


def check_preferred_batch_sizes(value: object, max_batch_size: int,
                                task_name: str) -> tuple[int, ...]:
    """``preferred_batch_sizes`` as a sorted tuple of distinct sizes in 1..max_batch_size."""
    if value is None:
        return ()
    sizes = value if isinstance(value, (tuple, list)) else None
    if sizes is None or not sizes or any(isinstance(s, bool) or not isinstance(s, int)
                                         or s < 1 for s in sizes):
        raise BatchedTaskOptionError(
            f"{task_name}: preferred_batch_sizes must be a non-empty list of ints >= 1 (the "
            f"batch sizes the function runs best at), e.g. (8, 16, 32); got {value!r}")
    too_big = [s for s in sizes if s > max_batch_size]
    if too_big:
        raise BatchedTaskOptionError(
            f"{task_name}: preferred_batch_sizes {too_big} exceed max_batch_size="
            f"{max_batch_size}, so no batch could ever have them; raise max_batch_size (usually "
            f"to the largest preferred size) or drop them")
    return tuple(sorted(set(sizes)))


def check_urgent_priority(value: object, task_name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 255:
        raise BatchedTaskOptionError(
            f"{task_name}: urgent_priority must be a message priority, an int from 0 to 255 "
            f"(items at least that urgent batch apart and go first), got {value!r}; e.g. "
            f"urgent_priority=9 on RabbitMQ (higher first), 0 on Redis (lower first)")
    return value


def check_urgent_wait_ms(value: object, task_name: str) -> float:
    if not _finite_non_negative(value):
        raise BatchedTaskOptionError(
            f"{task_name}: urgent_wait_ms must be a finite number of milliseconds >= 0 (how "
            f"long an urgent item's batch waits for more), got {value!r}")
    return float(value)


def padded_size(n: int, sizes: tuple[int, ...]) -> int:
    """The smallest of ``sizes`` that holds ``n`` items; ``n`` itself when none does (or
    there are no sizes)."""
    i = bisect.bisect_left(sizes, n)
    return sizes[i] if i < len(sizes) else n


def resolve_oom_errors(value: object, task_name: str) -> tuple[Any, ...]:
    """``oom_errors`` as a tuple of exception classes and ``(module, name)`` pairs matched by
    name (torch's, so that torch is never imported for it)."""
    if value == DEFAULT_OOM_ERRORS:
        if "torch" in sys.modules or importlib.util.find_spec("torch") is not None:
            return (MemoryError, _TORCH_OOM)
        return (MemoryError,)
    if value is None:
        return ()
    items = value if isinstance(value, (tuple, list)) else (value,)
    for exc_type in items:
        if not (isinstance(exc_type, type) and issubclass(exc_type, BaseException)):
            raise BatchedTaskOptionError(
                f"{task_name}: oom_errors must be exception classes (e.g. "
                f"(torch.cuda.OutOfMemoryError, MemoryError)), or () to never split; got "
                f"{exc_type!r}")
    return tuple(items)


def is_oom(exc: BaseException, oom_errors: tuple[Any, ...]) -> bool:
    for kind in oom_errors:
        if isinstance(kind, tuple):
            module = sys.modules.get(kind[0])
            cls = getattr(module, kind[1], None) if module is not None else None
            if cls is not None and isinstance(exc, cls):
                return True
        elif isinstance(exc, kind):
            return True
    return False


def _name(fn: object) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _finite_non_negative(value: object) -> TypeGuard[int | float]:
    """A real number (not a bool) >= 0 and finite: what costs and waits must be."""
    return (not isinstance(value, bool) and isinstance(value, (int, float)) and value >= 0
            and not math.isinf(value))

