"""celery-batches (the comparison) in its own virtualenv, ``benchmarks/.venvs/celery-batches``."""

from __future__ import annotations

import subprocess
import sys

from .common import BENCH, ROOT, log

CB_VENV = BENCH / ".venvs" / "celery-batches"
CB_PYTHON = CB_VENV / "bin" / "python"
CB_REQUIREMENTS = ["celery-batches==0.11", "celery[redis]<5.7"]


def ensure_cbatches(install: bool) -> tuple[bool, str]:
    def probe() -> tuple[bool, str]:
        if not CB_PYTHON.exists():
            return False, "no virtualenv"
        out = subprocess.run(
            [str(CB_PYTHON), "-c", "import celery, celery_batches, redis; "
             "from importlib.metadata import version as v; "
             "print(v('celery-batches'), celery.__version__)"],
            capture_output=True, text=True, timeout=60)
        if out.returncode:
            return False, out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "import failed"
        cb, cel = out.stdout.split()
        return True, f"celery-batches {cb} on celery {cel}"

    ok, info = probe()
    if ok or not install:
        return ok, info
    log(f"installing {' '.join(CB_REQUIREMENTS)} into {CB_VENV.relative_to(ROOT)} ...")
    try:
        CB_VENV.parent.mkdir(parents=True, exist_ok=True)
        if not CB_PYTHON.exists():
            subprocess.run([sys.executable, "-m", "venv", str(CB_VENV)], check=True,
                           capture_output=True, text=True, timeout=120)
        out = subprocess.run([str(CB_PYTHON), "-m", "pip", "install", "-q", *CB_REQUIREMENTS],
                             capture_output=True, text=True, timeout=600)
        if out.returncode:
            tail = (out.stderr or out.stdout).strip().splitlines()[-3:]
            return False, "pip install failed: " + " | ".join(tail)
    except Exception as exc:  # noqa: BLE001
        return False, f"install failed: {exc!r}"
    return probe()
