"""The configuration x fault matrix (``cells.py``), each cell a real worker checked against the
same invariants; and the guarantee tables of docs/guarantees.md, rendered from the same cells."""

from __future__ import annotations

from collections import Counter

import pytest

from .. import report
from ..workers import ROOT
from .cells import BEGIN, CELLS, END, PAGE, SITUATIONS, Cell, guarantee_tables
from .scenario import MAX_BATCH_SIZE, Scenario

#: Celery's own prefetch per pool process (worker_prefetch_multiplier's default).
CELERY_PREFETCH = 4


#: Cells whose path runs through Celery's own Request handlers (a lost child, a time limit, an
#: outcome the backend did not take), which differ between the releases: the version matrix
#: (noxfile.py) runs these on every Celery it claims, the rest on the newest.
HANDLER_PATHS = ("lost pool child", "time limits")


def _params() -> list:
    return [pytest.param(c, id=c.id, marks=[pytest.mark.celery_handlers]
                         if c.fault or c.situation in HANDLER_PATHS else [])
            for c in CELLS]


@pytest.mark.matrix
@pytest.mark.parametrize("cell", _params())
def test_cell(cell: Cell, tmp_path, queue, redis_client, start_worker) -> None:
    scenario = Scenario(cell, tmp_path, queue, redis_client, start_worker)
    try:
        scenario.setup()
        scenario.run()
        states = scenario.wait_until_settled(timeout=90)
        scenario.stop_sampling()
        check(cell, scenario, states)
    finally:
        scenario.teardown()


def check(cell: Cell, scenario: Scenario, states: dict) -> None:
    runs = scenario.runs()
    wrong = []
    for kind, x, result in scenario.items:
        state, value = states[result.id]
        if state not in cell.states(kind):
            wrong.append(f"{kind} item {x}: {state}, expected {sorted(cell.states(kind))}")
        elif state == "SUCCESS" and kind in ("ok", "retry", "retry3", "autoretry", "chord") \
                and value is not None and value != x * 2:
            wrong.append(f"{kind} item {x}: result {value!r}, expected {x * 2}")
        if runs.get(x, 0) > cell.runs_allowed(kind):
            wrong.append(f"{kind} item {x} ran {runs[x]} times, at most "
                         f"{cell.runs_allowed(kind)} allowed")
    assert not wrong, "\n".join(wrong[:20]) + (f"\n... {len(wrong) - 20} more" if
                                                len(wrong) > 20 else "")
    if scenario.chord_result is not None:
        assert scenario.chord_result.get(timeout=30) == sum(x * 2 for _, x, _ in scenario.items)
    log = scenario.worker_log()
    for line in cell.log_has:
        assert line in log, f"the worker never logged {line!r}: the fault hit nothing"
    if cell.max_calls is not None:
        assert scenario.calls() <= cell.max_calls, \
            f"the function ran {scenario.calls()} times, at most {cell.max_calls} expected"
    mean = bound = None
    sizes = scenario.batch_sizes()
    if cell.backlog and not any(kind == "oom" for kind, _ in cell.workload):
        full = sizes[:max(1, sum(n for _, n in cell.workload) // MAX_BATCH_SIZE - 1)]
        mean = sum(full) / len(full)
        assert mean >= 0.75 * MAX_BATCH_SIZE, f"batches didn't fill: {sizes}"
    if cell.backlog and scenario.unacked:
        bound = unacked_bound(cell)
        assert max(scenario.unacked) <= bound, (max(scenario.unacked), bound)
    tally = Counter(states[r.id][0] for _, _, r in scenario.items)
    report.add(f"matrix {cell.id} ({cell.pool}, {cell.fault or 'no fault'})", cell.broker,
               len(scenario.items), sum(n for s, n in tally.items() if s != "PENDING"),
               sum(1 for n in runs.values() if n > 1),
               f"{dict(tally)}; max runs {max(runs.values(), default=0)}"
               + (f"; mean batch {mean:.1f}" if mean else "")
               + (f"; max unacked {max(scenario.unacked)} (bound {bound})" if bound else ""))


def unacked_bound(cell: Cell) -> int:
    """The bound docs/guarantees.md states: max_batch_size x (processes + 2) + Celery's own prefetch (one per
    process with worker_prefetch_multiplier=0); RabbitMQ's sampled count trails the acks."""
    multiplier = cell.settings.get("worker_prefetch_multiplier", CELERY_PREFETCH) or 1
    slack = MAX_BATCH_SIZE if cell.broker in ("rabbitmq", "quorum") else 0
    return MAX_BATCH_SIZE * (cell.concurrency + 2) + multiplier * cell.concurrency + slack


def test_guarantee_tables_come_from_the_matrix() -> None:
    """The guarantee and configuration tables of docs/guarantees.md are the ones these cells
    render: a row can't claim what no cell shows, and every situation has a cell."""
    assert {c.situation for c in CELLS} == set(SITUATIONS), \
        "every situation on the guarantees page needs a cell, and every cell a situation"
    page = (ROOT / PAGE).read_text()
    assert BEGIN in page and END in page, f"{PAGE} lost the matrix's markers"
    shown = page[page.index(BEGIN):page.index(END) + len(END)]
    assert shown == guarantee_tables(), \
        f"{PAGE}'s matrix tables are not tests/matrix/cells.py's: run `python -m tests.matrix.cells --write`"
