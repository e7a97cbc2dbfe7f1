"""celery-batches 0.11 baseline (runs in its own virtualenv: it pins ``celery<5.7``).

As celery-batches documents, results are stored per request with ``mark_as_done``, and the
worker's prefetch count must exceed ``flush_every`` (else the buffer never fills): prefetch is
``BENCH_CB_PREFETCH_MULTIPLIER`` x concurrency, default 200 -- the same number of messages
celery_batched holds for ``max_batch_size=100`` on one pool process.
"""

from __future__ import annotations

import os

from celery import Celery
from celery_batches import Batches

from ._common import configure

app = Celery("bench_cbatches")
configure(app, worker_prefetch_multiplier=int(os.environ.get("BENCH_CB_PREFETCH_MULTIPLIER", "200")))


@app.task(name="bench.cbatches.add", base=Batches, flush_every=100, flush_interval=0.05)
def add(requests):  # type: ignore[no-untyped-def]
    for request in requests:
        x, y = request.args
        app.backend.mark_as_done(request.id, x + y, request=request)
