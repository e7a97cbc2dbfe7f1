"""Shared by every module: paths, the default Redis URL, ``log`` and ``CorrectnessError``."""

from __future__ import annotations

import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
BENCH = ROOT / "benchmarks"
LOG_DIR = BENCH / ".logs"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/13"


T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[{time.monotonic() - T0:7.1f}s] {msg}", flush=True)


class CorrectnessError(Exception):
    """A wrong or missing result: the run fails (exit status 1)."""
