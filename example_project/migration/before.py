"""Before: the task written for celery-batches 0.11 (``pip install celery-batches``).

    celery -A before worker -Q migration          (from this directory)

The function receives the raw requests (``SimpleRequest``), reads each one's ``args`` and
``kwargs`` itself, and stores every result (or failure) itself; celery-batches stores nothing.
"""

import os

from celery import Celery
from celery_batches import Batches, SimpleRequest

REDIS = "redis://localhost:6379/0"
app = Celery("before", broker=os.environ.get("CELERY_BROKER_URL", REDIS),
             backend=os.environ.get("CELERY_RESULT_BACKEND", REDIS))
# celery-batches buffers only what the worker prefetches: the prefetch count must exceed
# flush_every, or batches are silently capped (it defaults to 4 per process).
app.conf.worker_prefetch_multiplier = 64


def tokens_of(text: str, lowercase: bool) -> list[str]:
    if not text.strip():
        raise ValueError("empty text")
    words = text.split()
    return [w.lower() for w in words] if lowercase else words


@app.task(name="migration.tokens", base=Batches,
          flush_every=16, flush_interval=0.1)
def tokens(requests: list[SimpleRequest]) -> None:
    for request in requests:
        text, *rest = request.args
        lowercase = rest[0] if rest else request.kwargs.get("lowercase", True)
        try:
            result = tokens_of(text, lowercase)
        except ValueError as exc:
            # No request=request: mark_as_failure reads request.errbacks,
            # which a SimpleRequest doesn't have (AttributeError).
            app.backend.mark_as_failure(request.id, exc)
        else:
            app.backend.mark_as_done(request.id, result, request=request)
