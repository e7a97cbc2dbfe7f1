#!/usr/bin/env python3
"""``celery flower``, with ``/metrics`` behind the same authentication as the UI and the API.

    python scripts/compose_flower.py -A example_project flower      # same arguments as celery

Flower serves ``/metrics`` (task names, worker names, counts) to anyone, even with
``--basic_auth`` set (mher/flower#1342); Prometheus can scrape with basic auth, so this requires
it there too. ``/healthcheck`` stays open: it says "OK" and nothing else, and the container's
healthcheck uses it. Everything else is Flower's own behaviour.
"""

from __future__ import annotations

import sys

from flower.views.monitor import Metrics
from tornado.web import authenticated


def protect_metrics() -> None:
    """Make ``GET /metrics`` ask for Flower's configured credentials (idempotent)."""
    if not getattr(Metrics.get, "_requires_auth", False):
        guarded = authenticated(Metrics.get)
        guarded._requires_auth = True  # type: ignore[attr-defined]
        Metrics.get = guarded  # type: ignore[method-assign]


if __name__ == "__main__":
    protect_metrics()
    from celery.__main__ import main

    sys.argv[0] = "celery"
    main()
