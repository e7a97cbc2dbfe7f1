"""The final table: its rows, number formats, the machine it ran on, and the markdown."""

from __future__ import annotations

import datetime as dt
import math
import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .common import DEFAULT_REDIS_URL, ROOT, log
from .config import Config
from .results import redis_client


@dataclass
class Row:
    metric: str
    batched: str = "—"
    plain: str = "—"
    cbatches: str = "—"
    ratio: str = "—"
    target: str = "—"
    met: str = "—"


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    load: dict[str, tuple[float, float]] = field(default_factory=dict)

    def add(self, *args: Any, **kwargs: Any) -> None:
        self.rows.append(Row(*args, **kwargs))

    def note(self, text: str) -> None:
        self.notes.append(text)
        log(f"note: {text}")

    def fail(self, text: str) -> None:
        self.failures.append(text)
        print(f"\n!!! CORRECTNESS FAILURE: {text}\n", file=sys.stderr, flush=True)


def fmt_rate(x: float | None) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:,.0f}"


def fmt_ms(x: float | None) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:.1f}"


def fmt_ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
        return "n/a"
    return f"{a / b:.2f}×"


def met(ok: bool | None) -> str:
    return "—" if ok is None else ("yes" if ok else "**NO**")


def percentile(values: Sequence[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return float("nan")
    xs = sorted(values)
    k = (len(xs) - 1) * p / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def environment() -> dict[str, str]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = "none"
    torch_v = "not installed"
    try:
        import torch

        torch_v = torch.__version__
        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001
        pass
    import celery
    import kombu

    try:
        rv = redis_client(os.environ.get("BENCH_BROKER_URL", DEFAULT_REDIS_URL)).info("server")["redis_version"]
    except Exception:  # noqa: BLE001
        rv = "?"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "celery_batched"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        commit += " (celery_batched/ modified)" if dirty else ""
    except Exception:  # noqa: BLE001
        commit = "?"
    return {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "uname -m": platform.machine(),
        "CPU": f"{cpu} ({os.cpu_count()} logical CPUs)",
        "GPU": gpu,
        "Python": platform.python_version(),
        "versions": f"celery {celery.__version__}, kombu {kombu.__version__}, redis-server {rv}, torch {torch_v}",
        "commit": commit,
    }


def render(rep: Report, env: dict[str, str], cfg: Config, sections: Sequence[str]) -> str:
    lines = ["# celery_batched benchmarks", ""]
    lines += [f"- **{k}**: {v}" for k, v in env.items()]
    lines += [f"- **run**: {'--quick ' if cfg.quick else ''}sections {', '.join(sections)}; "
              f"one `celery worker -P prefork -c 1` per measurement; Redis broker + result backend "
              f"({cfg.redis_url})", ""]
    header = ["metric", "celery_batched", "plain Celery", "celery-batches 0.11", "ratio", "target", "met?"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---" for _ in header) + "|")
    for row in rep.rows:
        cells = [row.metric, row.batched, row.plain, row.cbatches, row.ratio, row.target, row.met]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    if rep.load:
        lines += ["", "Other programs' CPU use while each section ran (this machine is shared; "
                  f"{os.cpu_count()} CPUs): " + ", ".join(
                      f"{k} {o:.2f} CPUs" + (f" (+{st:.2f} steal)" if st >= 0.01 else "")
                      for k, (o, st) in rep.load.items())]
    if rep.notes:
        lines += ["", "Notes:"] + [f"- {n}" for n in rep.notes]
    lines += ["", f"Correctness: {'all checks passed' if not rep.failures else 'FAILED'}"]
    lines += [f"- FAILED: {f}" for f in rep.failures]
    return "\n".join(lines) + "\n"
