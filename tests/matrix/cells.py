"""The configuration x fault matrix: one table of cells, each a short real-worker scenario.

A cell names a broker, a result backend, a pool, the task's and the app's settings, a workload
of item kinds (``tests/apps/matrix.py``), a fault and when it strikes; ``test_matrix.py`` runs
it and checks the invariants every cell shares:

* every item ends stored -- SUCCESS, FAILURE or REVOKED, the state its kind expects -- once the
  fault is over: none is acknowledged without a stored outcome (it would stay PENDING);
* no item runs more often than ``max_runs`` allows (the "may run twice" column of
  docs/guarantees.md);
* with a backlog, batches fill (mean batch >= 75 % of ``max_batch_size``) and unacknowledged
  messages stay within the bound docs/guarantees.md states.

Not every product of the axes: a cell exists where a broker, backend, pool, fault or outcome
takes a path of its own. ``guarantee_tables()`` renders the "Delivery guarantees" page's
situation and "broker \\ result backend" tables from this table (``PAGE``;
``test_guarantee_tables_come_from_the_matrix`` checks the page holds exactly that).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: The state each kind of item ends in when nothing else is said (``Cell.expect`` overrides).
DEFAULT_STATES = {"ok": "SUCCESS", "fail": "FAILURE", "retry": "SUCCESS", "retry3": "SUCCESS",
                  "autoretry": "SUCCESS", "oom": "FAILURE", "unencodable": "FAILURE",
                  "expire": "REVOKED", "revoke": "REVOKED", "die": "FAILURE",
                  "slow": "FAILURE", "stuck": "FAILURE", "chord": "SUCCESS"}
#: Runs an item of each kind may take without a fault (a retried item runs twice).
DEFAULT_RUNS = {"retry": 2, "retry3": 4, "autoretry": 2, "expire": 0, "revoke": 0, "oom": 0, "die": 1,
                "slow": 0, "stuck": 0}


@dataclass(frozen=True)
class Cell:
    id: str
    #: The guarantees page's row this cell shows (``SITUATIONS``).
    situation: str
    broker: str = "redis"        # redis | sentinel | rabbitmq | quorum
    backend: str = "redis"       # redis | postgres (psycopg2) | psycopg3 | rpc
    pool: str = "prefork"        # prefork | threads | solo
    concurrency: int = 1
    task: str = "work"           # work | limited
    #: (kind, count) in sending order; kinds are interleaved round-robin.
    workload: tuple[tuple[str, int], ...] = (("ok", 48),)
    #: Sent before the worker starts (batches fill; unacked sampled) rather than while it runs.
    backlog: bool = False
    #: Sent with ``map_items`` (bulk submit) rather than one ``apply_async`` per item.
    bulk: bool = False
    settings: dict[str, Any] = field(default_factory=dict)
    task_options: dict[str, Any] = field(default_factory=dict)
    #: backend-down | backend-oom | backend-readonly | backend-noperm | no-scripts |
    #: no-scripts-acl | db-down | db-readonly | None
    fault: str | None = None
    #: The fault starts once this many items ran (0: before the worker starts), and lasts.
    fault_after: int = 0
    fault_s: float = 3.0
    #: State per kind where it differs from DEFAULT_STATES; a set where either may happen.
    expect: dict[str, Any] = field(default_factory=dict)
    #: Most runs per item, per kind (default DEFAULT_RUNS, else 1); "*" for every kind.
    max_runs: dict[str, int] = field(default_factory=dict)
    #: Where the guarantees page's "may run twice" column comes from, in words.
    twice: str = "nothing"
    #: Most calls of the function over the whole cell (None: not counted).
    max_calls: int | None = None
    #: Lines the worker's log must hold (a fault that did not hit anything proves nothing).
    log_has: tuple[str, ...] = ()

    def runs_allowed(self, kind: str) -> int:
        return self.max_runs.get(kind, self.max_runs.get("*", DEFAULT_RUNS.get(kind, 1)))

    def states(self, kind: str) -> set[str]:
        state = self.expect.get(kind, DEFAULT_STATES[kind])
        return set(state) if isinstance(state, (set, frozenset, tuple)) else {state}


#: What happens to the items, per row of the guarantees page (the cells that show it are listed beside it).
SITUATIONS: dict[str, str] = {
    "plain": "every item's own state and result; batches fill from a backlog",
    "failures": "the failing items FAILURE alone, their neighbours SUCCESS",
    "retries": "RETRY stored, re-sent alone, SUCCESS on the next run",
    "oom": "split in halves down to the item that doesn't fit, which fails alone "
           "(`MemoryError`); the worker keeps fetching",
    "stored by the pool": "`result_extended`, `track_started`, chords, the database backend: "
                          "stored by the pool process, then acknowledged",
    "backend down": "retried with the backend's `retry_policy`; past it, not acknowledged: "
                    "handed back to the broker and run again once the backend answers",
    "backend refuses writes": "retried with the backend's `retry_policy`, then handed back "
                              "like an outage",
    "no scripts": "stored with pipelined SET + PUBLISH instead of one script per batch; an "
                  "unencodable result fails alone",
    "retry during an outage": "the retry message carries the item on: the original is "
                              "acknowledged, RETRY logged as not stored",
    "expired while buffered, backend down": "REVOKED can't be stored: handed back, marked "
                                            "REVOKED on a later delivery; the rest of its "
                                            "batch runs. RabbitMQ drops a handed-back message "
                                            "that has expired (its TTL, as for any Celery task "
                                            "that expires in the queue): PENDING there",
    "lost pool child": "FAILURE `WorkerLostError` (with `reject_on_worker_lost=True`: "
                       "requeued and run again)",
    "lost pool child, backend down": "its FAILURE can't be stored: handed back, not "
                                     "acknowledged first",
    "time limits": "every item of the batch FAILURE (`SoftTimeLimitExceeded` / "
                   "`TimeLimitExceeded`); with `isolate_failures` no halves run after the "
                   "soft limit",
    "hard time limit, backend down": "its FAILURE can't be stored: handed back, not "
                                     "acknowledged first",
    "acks_late=False, backend down": "acknowledged when the batch started (at most once): "
                                     "the items stay PENDING, logged at ERROR with their ids",
}

_MIX = (("ok", 24), ("fail", 4), ("retry", 4), ("autoretry", 4))
_REFUSAL = dict(workload=(("ok", 40), ("fail", 8)), fault_after=16, fault_s=3.0,
                max_runs={"*": 8}, twice="the batches whose outcome could not be stored",
                log_has=("handed back to the broker",))

CELLS: tuple[Cell, ...] = (
    # --- brokers, backends, pools: a backlog that must fill batches, every outcome kind ------
    Cell("redis-redis-prefork", "plain", workload=(("ok", 96),) + _MIX[1:], backlog=True),
    Cell("redis-redis-threads", "plain", pool="threads", concurrency=2,
         workload=(("ok", 96),) + _MIX[1:], backlog=True),
    Cell("redis-redis-solo", "plain", pool="solo", workload=(("ok", 96),) + _MIX[1:],
         backlog=True),
    Cell("sentinel-sentinel-prefork", "plain", broker="sentinel", backend="sentinel",
         workload=(("ok", 96),) + _MIX[1:], backlog=True),
    Cell("rabbitmq-redis-prefork", "plain", broker="rabbitmq",
         workload=(("ok", 96),) + _MIX[1:], backlog=True),
    Cell("quorum-redis-prefork", "plain", broker="quorum", workload=(("ok", 160),),
         backlog=True),
    Cell("quorum-redis-prefork-multiplier-0", "plain", broker="quorum",
         workload=(("ok", 160),), backlog=True,
         settings={"worker_prefetch_multiplier": 0}),
    Cell("rabbitmq-rpc-prefork-bulk", "plain", broker="rabbitmq", backend="rpc", bulk=True,
         workload=(("ok", 64),)),
    Cell("redis-postgres-prefork", "stored by the pool", backend="postgres", workload=_MIX),
    Cell("redis-psycopg3-threads", "stored by the pool", backend="psycopg3", pool="threads",
         concurrency=2, workload=_MIX),
    Cell("redis-redis-extended", "stored by the pool", workload=_MIX,
         settings={"result_extended": True}),
    Cell("rabbitmq-redis-track-started", "stored by the pool", broker="rabbitmq",
         workload=_MIX, settings={"task_track_started": True}),
    Cell("redis-redis-chord", "stored by the pool", workload=(("chord", 32),)),
    # --- outcome paths --------------------------------------------------------------------
    Cell("redis-redis-failures", "failures", workload=(("ok", 16), ("fail", 8),
                                                      ("unencodable", 4))),
    Cell("redis-redis-retries", "retries", workload=(("ok", 8), ("retry", 8), ("autoretry", 8))),
    Cell("redis-redis-oom", "oom", workload=(("ok", 192), ("oom", 64)), backlog=True),
    Cell("rabbitmq-redis-oom", "oom", broker="rabbitmq", workload=(("ok", 192), ("oom", 64)),
         backlog=True),
    Cell("redis-redis-lost-child", "lost pool child", workload=(("die", 1), ("ok", 7)),
         expect={"ok": {"FAILURE", "SUCCESS"}}),
    Cell("rabbitmq-redis-lost-child-requeue", "lost pool child", broker="rabbitmq",
         workload=(("die", 1), ("ok", 7)), task_options={"reject_on_worker_lost": True},
         expect={"die": "SUCCESS"}, max_runs={"die": 1, "ok": 1},
         twice="with requeue: that batch"),
    Cell("redis-redis-soft-limit-isolating", "time limits", task="limited",
         workload=(("slow", 8),), task_options={"isolate_failures": True},
         max_runs={"*": 0}, max_calls=2),
    Cell("rabbitmq-redis-hard-limit", "time limits", broker="rabbitmq", task="limited",
         workload=(("stuck", 4),), max_runs={"*": 0}),
    # --- backend faults ---------------------------------------------------------------------
    Cell("redis-redis-down-prefork", "backend down", fault="backend-down", **_REFUSAL),
    Cell("redis-redis-down-threads", "backend down", fault="backend-down", pool="threads",
         concurrency=2, **_REFUSAL),
    Cell("rabbitmq-redis-down", "backend down", broker="rabbitmq", fault="backend-down",
         **_REFUSAL),
    # The database backend's retry_policy (Celery's default, about 19 s) outlasts the fault:
    # its writes are retried until the database answers, nothing is handed back.
    Cell("redis-postgres-down", "backend down", backend="postgres", fault="db-down",
         **{**_REFUSAL, "log_has": ("the result backend refused a write",)}),
    Cell("redis-redis-oom-refusal", "backend refuses writes", fault="backend-oom",
         **_REFUSAL),
    Cell("redis-redis-readonly", "backend refuses writes", fault="backend-readonly",
         **_REFUSAL),
    Cell("redis-redis-noperm-threads", "backend refuses writes", fault="backend-noperm",
         pool="threads", concurrency=2, **_REFUSAL),
    Cell("redis-redis-readonly-extended", "backend refuses writes", fault="backend-readonly",
         settings={"result_extended": True}, **_REFUSAL),
    Cell("redis-redis-oom-track-started", "backend refuses writes", fault="backend-oom",
         settings={"task_track_started": True}, **_REFUSAL),
    Cell("redis-postgres-readonly", "backend refuses writes", backend="postgres",
         fault="db-readonly", **{**_REFUSAL, "log_has": ("the result backend refused a write",)}),
    Cell("redis-redis-no-scripts", "no scripts", fault="no-scripts",
         workload=(("ok", 40), ("unencodable", 4))),
    Cell("redis-redis-no-scripts-acl", "no scripts", fault="no-scripts-acl",
         workload=(("ok", 40), ("unencodable", 4))),
    Cell("redis-redis-retry-outage", "retry during an outage", fault="backend-down",
         fault_after=0, fault_s=4.0, workload=(("retry3", 4), ("ok", 12)),
         max_runs={"*": 14}, twice="the retried items' later runs, handed back"),
    Cell("redis-redis-expire-outage", "expired while buffered, backend down",
         fault="backend-down", fault_after=0, fault_s=3.0,
         workload=(("expire", 1), ("ok", 2)), task_options={"wait_ms": 1500},
         max_runs={"ok": 4}, twice="the items handed back with it"),
    Cell("rabbitmq-redis-expire-outage", "expired while buffered, backend down",
         broker="rabbitmq", fault="backend-down", fault_after=0, fault_s=3.0,
         workload=(("expire", 1), ("ok", 2)), task_options={"wait_ms": 1500},
         expect={"expire": {"REVOKED", "PENDING"}}, max_runs={"ok": 4},
         twice="the items handed back with it"),
    Cell("redis-redis-lost-child-outage", "lost pool child, backend down",
         fault="backend-down", fault_after=0, fault_s=3.0,
         workload=(("die", 1), ("ok", 7)), expect={"die": {"FAILURE", "SUCCESS"},
                                                   "ok": {"FAILURE", "SUCCESS"}},
         max_runs={"*": 6}, twice="the lost batch, handed back"),
    Cell("redis-redis-hard-limit-outage", "hard time limit, backend down", task="limited",
         fault="backend-down", fault_after=0, fault_s=3.0, workload=(("stuck", 4),),
         max_runs={"*": 0}, twice="the batch, until its failure can be stored"),
    Cell("redis-redis-acks-early-outage", "acks_late=False, backend down",
         fault="backend-down", fault_after=0, fault_s=3.0, workload=(("ok", 8),),
         task_options={"acks_late": False}, expect={"ok": "PENDING"},
         log_has=("acks_late=False",)),
)


def by_id() -> dict[str, Cell]:
    return {cell.id: cell for cell in CELLS}


BROKERS = {"redis": "Redis", "sentinel": "Redis Sentinel", "rabbitmq": "RabbitMQ (classic)",
           "quorum": "RabbitMQ (quorum queue)"}
BACKENDS = {"redis": "Redis", "sentinel": "Redis Sentinel",
            "postgres": "PostgreSQL (`db+postgresql+psycopg2://`)",
            "psycopg3": "PostgreSQL (`db+postgresql+psycopg://`, psycopg 3)", "rpc": "`rpc://`"}
#: The page that shows the generated tables, and its markers around them.
PAGE = "docs/guarantees.md"
BEGIN, END = "<!-- matrix:begin (generated from tests/matrix/cells.py) -->", "<!-- matrix:end -->"


def _where(cell: Cell) -> str:
    parts = [f"{cell.broker}/{cell.backend}/{cell.pool}"]
    if cell.fault:
        parts.append(cell.fault)
    extra = sorted(k.removeprefix("task_") + ("" if v is True else f"={v}")
                   for k, v in cell.settings.items())
    extra += sorted(f"{k}={v}" for k, v in cell.task_options.items() if k != "wait_ms")
    return "`" + " ".join(parts + extra) + "`"


def guarantee_tables() -> str:
    """The matrix tables of ``PAGE``: what happens per situation, and what runs where."""
    lines = [BEGIN, "", "| situation | what happens to the items | may run twice | cells |",
             "|---|---|---|---|"]
    for situation, what in SITUATIONS.items():
        cells = [c for c in CELLS if c.situation == situation]
        twice = "; ".join(dict.fromkeys(c.twice for c in cells))
        lines.append(f"| {situation} | {what} | {twice} | "
                     f"{', '.join(_where(c) for c in cells)} |")
    pools = sorted({c.pool for c in CELLS})
    lines += ["", "| broker \\ result backend | " + " | ".join(BACKENDS.values()) + " |",
              "|---|" + "---|" * len(BACKENDS)]
    for broker, broker_name in BROKERS.items():
        row = []
        for backend in BACKENDS:
            ran = [c for c in CELLS if c.broker == broker and c.backend == backend]
            row.append(", ".join(p for p in pools if any(c.pool == p for c in ran)) or "—")
        lines.append(f"| {broker_name} | " + " | ".join(row) + " |")
    lines += ["", END]
    return "\n".join(lines)


def write_page(path: str = PAGE) -> None:
    """Put the current tables between the page's markers."""
    with open(path) as f:
        text = f.read()
    start, end = text.index(BEGIN), text.index(END) + len(END)
    with open(path, "w") as f:
        f.write(text[:start] + guarantee_tables() + text[end:])


if __name__ == "__main__":  # python -m tests.matrix.cells [--write]
    import sys

    if "--write" in sys.argv:
        write_page()
    else:
        print(guarantee_tables())
