"""The example project's app (``example_project``), plus the benchmarks' worker-ready marker."""

from __future__ import annotations

from example_project import app  # noqa: F401  (celery -A finds ``app`` here)

from ._common import install_ready_marker

install_ready_marker()
