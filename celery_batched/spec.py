"""What a batched task is, checked once when the task is defined.

``BatchSpec`` holds the batching options and the shape of the function's parameters, and turns
one item's ``(args, kwargs)`` into one value per parameter. Everything here runs at class
creation (options, signature) or on the worker's hot path (``bind_item``), so binding avoids
``inspect.Signature.bind`` and costs a few list operations per item.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final

from .errors import (
    BatchedTaskDefinitionError,
    BatchedTaskOptionError,
    ItemArgumentsError,
)
from .policies import (
    DEFAULT_MAX_OPEN_KEYS,
    DEFAULT_OOM_ERRORS,
    ItemPolicy,
    check_cost_bound,
    check_max_latency_ms,
    check_max_open_keys,
    check_preferred_batch_sizes,
    check_urgent_priority,
    check_urgent_wait_ms,
    item_policy,
    padded_size,
    resolve_oom_errors,
)

DEFAULT_MAX_BATCH_SIZE: Final = 64
DEFAULT_WAIT_MS: Final = 20
DEFAULT_URGENT_WAIT_MS: Final = 2

_MISSING: Final = object()
_FILLABLE = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD,
             inspect.Parameter.KEYWORD_ONLY)


def check_max_batch_size(value: object, task_name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BatchedTaskDefinitionError(
            f"{task_name}: max_batch_size must be an int, got {value!r} "
            f"({type(value).__name__}); for example max_batch_size=64")
    if value < 1:
        raise BatchedTaskOptionError(
            f"{task_name}: max_batch_size must be >= 1, got {value}")
    return value


def check_wait_ms(value: object, task_name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BatchedTaskDefinitionError(
            f"{task_name}: wait_ms must be a number of milliseconds, got {value!r} "
            f"({type(value).__name__}); for example wait_ms=20")
    if not value >= 0 or value == float("inf"):
        raise BatchedTaskOptionError(
            f"{task_name}: wait_ms must be a finite number >= 0, got {value}")
    return float(value)


@dataclass(frozen=True)
class BatchSpec:
    """The batching options and parameter layout of one batched task."""

    task_name: str
    max_batch_size: int
    wait_ms: float
    param_names: tuple[str, ...]
    n_positional: int
    defaults: tuple[Any, ...]
    is_async: bool
    _index: Mapping[str, int] = field(repr=False)
    #: ``batch_key`` / ``batch_cost`` evaluated per item on the consumer (``policies.py``).
    policy: ItemPolicy | None = None
    max_open_keys: int = DEFAULT_MAX_OPEN_KEYS
    max_batch_cost: float | None = None
    max_latency_ms: float | None = None
    #: Exceptions on which a batch is split in halves and re-run (``policies.is_oom``).
    oom_errors: tuple[Any, ...] = ()
    #: Sizes the function runs best at, ascending (``buffer.py`` flushes by time at them).
    preferred_batch_sizes: tuple[int, ...] = ()
    #: Message priority from which items batch apart and go first (``buffer.urgency``).
    urgent_priority: int | None = None
    urgent_wait_ms: float = DEFAULT_URGENT_WAIT_MS

    @classmethod
    def from_function(cls, fun: Callable[..., Any], *, skip_first: bool, task_name: str,
                      max_batch_size: object, wait_ms: object, batch_key: object = None,
                      max_open_keys: object = DEFAULT_MAX_OPEN_KEYS, batch_cost: object = None,
                      max_batch_cost: object = None, max_latency_ms: object = None,
                      wait_ms_set: bool = False,
                      oom_errors: object = DEFAULT_OOM_ERRORS,
                      preferred_batch_sizes: object = None, urgent_priority: object = None,
                      urgent_wait_ms: object = DEFAULT_URGENT_WAIT_MS) -> BatchSpec:
        size = check_max_batch_size(max_batch_size, task_name)
        preferred = check_preferred_batch_sizes(preferred_batch_sizes, size, task_name)
        urgent_at = check_urgent_priority(urgent_priority, task_name)
        urgent_wait = check_urgent_wait_ms(urgent_wait_ms, task_name)
        wait = check_wait_ms(wait_ms, task_name)
        open_keys = check_max_open_keys(max_open_keys, task_name)
        cost_bound = check_cost_bound(batch_cost, max_batch_cost, task_name)
        latency = check_max_latency_ms(max_latency_ms, wait_ms_set, task_name)
        oom = resolve_oom_errors(oom_errors, task_name)
        try:
            sig = inspect.signature(fun)
        except (TypeError, ValueError) as exc:
            raise BatchedTaskDefinitionError(
                f"{task_name}: can't read the batched function's signature: {exc}") from exc
        params = list(sig.parameters.values())
        if skip_first:
            params = params[1:]
        for p in params:
            if p.kind not in _FILLABLE:
                star = "*" if p.kind is inspect.Parameter.VAR_POSITIONAL else "**"
                raise BatchedTaskDefinitionError(
                    f"{task_name}: parameter {star}{p.name} can't be batched: every parameter "
                    f"receives one list with a value per item. Replace it with named parameters.")
        if not params:
            raise BatchedTaskDefinitionError(
                f"{task_name}: a batched function needs at least one parameter; it is called "
                f"with one list per parameter, e.g. def {task_name.rsplit('.', 1)[-1]}(xs: list[int]).")
        names = tuple(p.name for p in params)
        n_positional = sum(1 for p in params if p.kind is not inspect.Parameter.KEYWORD_ONLY)
        defaults = tuple(_MISSING if p.default is inspect.Parameter.empty else p.default
                         for p in params)
        positional_only = {p.name for p in params if p.kind is inspect.Parameter.POSITIONAL_ONLY}
        index = {n: i for i, n in enumerate(names) if n not in positional_only}
        return cls(task_name=task_name, max_batch_size=size, wait_ms=wait, param_names=names,
                   n_positional=n_positional, defaults=defaults,
                   is_async=inspect.iscoroutinefunction(fun), _index=index,
                   policy=item_policy(task_name, names, n_positional, batch_key, batch_cost),
                   max_open_keys=open_keys, max_batch_cost=cost_bound, max_latency_ms=latency,
                   oom_errors=oom, preferred_batch_sizes=preferred,
                   urgent_priority=urgent_at, urgent_wait_ms=urgent_wait)

    def reconfigured(self, changes: Mapping[str, object]) -> BatchSpec:
        """This spec with some options changed on a running worker, checked as at definition.

        Values may be strings (from the command line). Switching between ``wait_ms`` and
        ``max_latency_ms``, or adding a cost bound to a task without ``batch_cost``, needs a
        new definition.
        """
        name = self.task_name
        unknown = sorted(set(changes) - set(RECONFIGURABLE))
        if unknown:
            raise BatchedTaskOptionError(
                f"{name}: can't change {', '.join(unknown)} on a running worker; "
                f"these can be: {', '.join(RECONFIGURABLE)}")
        if "wait_ms" in changes and self.max_latency_ms is not None:
            raise BatchedTaskOptionError(
                f"{name} batches with max_latency_ms: change max_latency_ms, not wait_ms")
        if "max_latency_ms" in changes and self.max_latency_ms is None:
            raise BatchedTaskOptionError(
                f"{name} batches with wait_ms: change wait_ms (switching to max_latency_ms "
                f"needs a new definition of the task)")
        if "urgent_wait_ms" in changes and self.urgent_priority is None:
            raise BatchedTaskOptionError(
                f"{name} has no urgent_priority: urgent_wait_ms needs urgent_priority in its "
                f"definition")
        if "max_batch_cost" in changes and self.max_batch_cost is None:
            raise BatchedTaskOptionError(
                f"{name} has no batch_cost: max_batch_cost needs batch_cost in its definition")
        return replace(self, **{option: RECONFIGURABLE[option](_number(value, option, name), name)
                                for option, value in changes.items()})

    def settings(self) -> dict[str, Any]:
        """The batching options in force, for ``inspect batching_config``."""
        out: dict[str, Any] = {"max_batch_size": self.max_batch_size}
        if self.max_latency_ms is None:
            out["wait_ms"] = self.wait_ms
        else:
            out["max_latency_ms"] = self.max_latency_ms
        if self.policy is not None and self.policy.key_name is not None:
            out["batch_key"] = self.policy.key_name
            out["max_open_keys"] = self.max_open_keys
        if self.max_batch_cost is not None:
            out["max_batch_cost"] = self.max_batch_cost
        out["oom_errors"] = [_exc_name(e) for e in self.oom_errors]
        if self.preferred_batch_sizes:
            out["preferred_batch_sizes"] = list(self.preferred_batch_sizes)
        if self.urgent_priority is not None:
            out["urgent_priority"] = self.urgent_priority
            out["urgent_wait_ms"] = self.urgent_wait_ms
        return out

    def padded_size(self, n: int) -> int:
        """The preferred batch size a call of ``n`` items runs at (``policies.padded_size``)."""
        return padded_size(n, self.preferred_batch_sizes)

    @property
    def wait_s(self) -> float:
        return self.wait_ms / 1000.0

    def bind_item(self, args: Sequence[Any] | None, kwargs: Mapping[str, Any] | None) -> tuple[Any, ...]:
        """One item's call arguments -> one value per parameter, or :class:`ItemArgumentsError`."""
        args = () if args is None else args
        n_args = len(args)
        n_params = len(self.param_names)
        if n_args > self.n_positional:
            raise ItemArgumentsError(
                f"{self.task_name}() takes {self.n_positional} positional argument(s) per item "
                f"({self._describe()}) but {n_args} were given")
        if not kwargs and n_args == n_params:
            return tuple(args)
        values = list(args) + [_MISSING] * (n_params - n_args)
        for key, value in (kwargs or {}).items():
            i = self._index.get(key)
            if i is None:
                raise ItemArgumentsError(
                    f"{self.task_name}() got an unexpected keyword argument {key!r}; "
                    f"its parameters are ({self._describe()})")
            if i < n_args:
                raise ItemArgumentsError(
                    f"{self.task_name}() got multiple values for argument {key!r}")
            values[i] = value
        missing = []
        for i, value in enumerate(values):
            if value is _MISSING:
                default = self.defaults[i]
                if default is _MISSING:
                    missing.append(self.param_names[i])
                else:
                    values[i] = default
        if missing:
            raise ItemArgumentsError(
                f"{self.task_name}() missing {len(missing)} argument(s) for this item: "
                f"{', '.join(map(repr, missing))}; its parameters are ({self._describe()})")
        return tuple(values)

    def _describe(self) -> str:
        return ", ".join(self.param_names)


def _number(value: object, option: str, task_name: str) -> object:
    """A command-line string as the int or float it spells; anything else as given."""
    if not isinstance(value, str):
        return value
    try:
        return int(value)
    except ValueError:
        try:
            return float(value)
        except ValueError:
            raise BatchedTaskOptionError(
                f"{task_name}: {option}={value!r} is not a number") from None


def _exc_name(kind: Any) -> str:
    if isinstance(kind, tuple):
        return ".".join(kind)
    return f"{kind.__module__}.{kind.__qualname__}".removeprefix("builtins.")


@dataclass(frozen=True)
class Option:
    """One batching option of a task: its default, what it means, and -- where a running worker
    may change it (``configure_batching``) -- the definition-time check the new value takes."""

    name: str
    default: Any
    meaning: str
    #: The check ``BatchSpec.reconfigured`` runs; None: fixed when the task is defined.
    runtime_check: Callable[[Any, str], Any] | None = None
    #: The default as the docs' options table shows it, where its repr doesn't say it.
    default_text: str | None = None


#: Every batching option: what ``BatchedTask`` declares, what ``configure_batching`` may change
#: (and its command-line signature), and the docs' options table all read this one table.
OPTIONS: Final[tuple[Option, ...]] = (
    Option("max_batch_size", DEFAULT_MAX_BATCH_SIZE, "most items per call (int ≥ 1)",
           check_max_batch_size),
    Option("wait_ms", DEFAULT_WAIT_MS, "longest wait, from the **first** buffered item, before a "
           "partial batch runs (≥ 0; 0 = flush on the next event-loop turn)", check_wait_ms),
    Option("isolate_failures", False, "when the whole call raises, re-run the batch split in "
           "halves until the failing items are alone (see below)"),
    Option("batch_key", None, "items with different keys never share a batch: a parameter's "
           "name, or a function of one item's arguments ([Batching policies](policies.md))"),
    Option("max_open_keys", DEFAULT_MAX_OPEN_KEYS, "most keys with items waiting at once; a new "
           "key beyond it flushes the batch that waited longest", check_max_open_keys),
    Option("batch_cost", None, "a function of one item's arguments giving its cost (say, "
           "tokens), with `max_batch_cost`"),
    Option("max_batch_cost", None, "a batch's total cost stays ≤ this; an item costing more runs "
           "alone", lambda value, name: check_cost_bound(True, value, name)),
    Option("max_latency_ms", None, "a latency target for wait + execution, instead of `wait_ms` "
           "(set one, not both)", lambda value, name: check_max_latency_ms(value, False, name)),
    Option("oom_errors", DEFAULT_OOM_ERRORS, "on these the batch is split in halves and re-run, "
           "down to single items; `()` never splits",
           default_text="`MemoryError`, `torch.cuda.OutOfMemoryError`"),
    Option("max_backlog", None, "producers refuse to send (`Backpressure`) while the task's "
           "queue holds this many messages (int ≥ 1; [backpressure](writing-tasks.md#backpressure))"),
    Option("preferred_batch_sizes", None, "sizes the function runs best at (CUDA graphs, "
           "TensorRT): a batch flushed by time leaves at the largest that fits, the rest waits "
           "once more; `task.padded_size(n)` gives the size to pad to "
           "([Batching policies](policies.md))"),
    Option("urgent_priority", None, "items whose message priority is at least this urgent "
           "(≥ on RabbitMQ, ≤ on Redis) batch apart with `urgent_wait_ms` and go first to a "
           "free pool process ([Batching policies](policies.md))"),
    Option("urgent_wait_ms", DEFAULT_URGENT_WAIT_MS, "`wait_ms` of urgent items' batches (with "
           "`urgent_priority`)", check_urgent_wait_ms),
)
DEFAULTS: Final[dict[str, Any]] = {o.name: o.default for o in OPTIONS}
#: What ``BatchSpec.reconfigured`` (remote control: ``configure_batching``) may change, and the
#: definition-time check of each.
RECONFIGURABLE: Final[dict[str, Callable[[Any, str], Any]]] = {
    o.name: o.runtime_check for o in OPTIONS if o.runtime_check is not None}


def check_max_backlog(value: object, task_name: str) -> int | None:
    """``max_backlog``: None (no bound) or a whole number of messages >= 1."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BatchedTaskOptionError(
            f"{task_name}: max_backlog must be None (no bound) or an int >= 1 (messages waiting "
            f"in the task's queue), got {value!r}")
    return value


def options_table() -> str:
    """The options table of docs/writing-tasks.md (``tests/test_behaviour.py`` checks the page
    holds it)."""
    rows = ["| option | default | on a running worker | meaning |", "|---|---|---|---|"]
    for o in OPTIONS:
        default = o.default_text or f"`{o.default!r}`"
        changeable = "`configure_batching`" if o.runtime_check is not None else "—"
        rows.append(f"| `{o.name}` | {default} | {changeable} | {o.meaning} |")
    return "\n".join(rows)
