"""The migration example (example_project/migration/): the same items through the task written
for celery-batches and through the same task on celery-batched give the same outcomes.

Both run in real ``celery worker`` processes on Redis. celery-batches 0.11 pins ``celery<5.7``,
so its worker runs from a virtualenv of its own: the benchmarks' (``benchmarks/.venvs/celery-batches``,
the same requirements), made here on first use.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from celery import Celery

from .apps._common import BACKEND, BROKER
from .workers import ROOT, Worker

MIGRATION = ROOT / "example_project" / "migration"
CB_VENV = ROOT / "benchmarks" / ".venvs" / "celery-batches"
CB_PYTHON = CB_VENV / "bin" / "python"
CB_REQUIREMENTS = ["celery-batches==0.11", "celery[redis]<5.7"]

#: (args, kwargs) per item: positional, by name, the default, and an item that fails alone.
ITEMS = [
    (("The Quick brown fox",), {}),
    (("Jumps OVER the lazy dog",), {"lowercase": False}),
    (("Lazy Dogs sleep", False), {}),
    (("   ",), {}),
    *[((f"Item {i} of MANY words {'x ' * (i % 5)}",), {"lowercase": i % 3 != 0}) for i in range(60)],
]


def _imports(python: Path) -> bool:
    return python.exists() and subprocess.run(
        [str(python), "-c", "import celery_batches, celery, redis"],
        capture_output=True, timeout=60).returncode == 0


@pytest.fixture(scope="module")
def cb_python() -> Path:
    if not _imports(CB_PYTHON):
        CB_VENV.parent.mkdir(parents=True, exist_ok=True)
        if not CB_PYTHON.exists():
            subprocess.run([sys.executable, "-m", "venv", str(CB_VENV)], check=True, timeout=120)
        out = subprocess.run([str(CB_PYTHON), "-m", "pip", "install", "-q", *CB_REQUIREMENTS],
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, f"can't install {CB_REQUIREMENTS}: {out.stderr[-2000:]}"
    assert _imports(CB_PYTHON)
    return CB_PYTHON


def outcomes(queue: str) -> list[tuple[str, object]]:
    """Send ITEMS by name, as any caller would, and read back each item's state and result."""
    client = Celery("migration-client", broker=BROKER, backend=BACKEND)
    try:
        results = [client.send_task("migration.tokens", args, kwargs, queue=queue)
                   for args, kwargs in ITEMS]
        out = []
        for r in results:
            value = r.get(timeout=60, propagate=False)
            if isinstance(value, BaseException):
                value = (type(value).__name__, str(value))
            out.append((r.state, value))
        return out
    finally:
        client.close()


def test_same_inputs_same_outputs_under_both(cb_python: Path, redis_client, queue: str,  # noqa: ANN001
                                             tmp_path: Path) -> None:
    seen, logs = {}, {}
    for module, python in (("before", cb_python), ("after", Path(sys.executable))):
        worker = Worker(module, queues=f"{queue}-{module}", log_dir=tmp_path,
                        env={"CELERY_BROKER_URL": BROKER, "CELERY_RESULT_BACKEND": BACKEND,
                             "PYTHONPATH": f"{MIGRATION}{os.pathsep}{ROOT}"})
        worker.cmd[0] = str(python)  # celery-batches' worker runs in its own virtualenv
        worker.start(timeout=60)
        try:
            seen[module] = outcomes(f"{queue}-{module}")
        finally:
            worker.stop()
        logs[module] = worker.log()
    before, after = seen["before"], seen["after"]
    assert before[:4] == [
        ("SUCCESS", ["the", "quick", "brown", "fox"]),
        ("SUCCESS", ["Jumps", "OVER", "the", "lazy", "dog"]),
        ("SUCCESS", ["Lazy", "Dogs", "sleep"]),
        ("FAILURE", ("ValueError", "empty text")),
    ]
    assert after == before
    # celery-batches' worker ran on its own Celery (< 5.7); celery_batched's ran real batches.
    assert "celery_batched" not in logs["before"]
    sizes = [int(m) for m in re.findall(r"Batch \S+ of (\d+) migration\.tokens", logs["after"])]
    assert sum(sizes) == len(ITEMS) and max(sizes) > 1, logs["after"][-3000:]
