"""After: the same task on celery-batched.

    celery -A after worker -Q migration          (from this directory)

One list per parameter, one result per item returned; an exception instance fails its item
only. Results, states and per-item events are stored and sent for you.
"""

import os

from celery import Celery

from celery_batched import BatchedTask

REDIS = "redis://localhost:6379/0"
app = Celery("after", broker=os.environ.get("CELERY_BROKER_URL", REDIS),
             backend=os.environ.get("CELERY_RESULT_BACKEND", REDIS))
# No prefetch setting: the worker holds the messages its batches need by itself.


def tokens_of(text: str, lowercase: bool) -> list[str]:
    if not text.strip():
        raise ValueError("empty text")
    words = text.split()
    return [w.lower() for w in words] if lowercase else words


@app.task(name="migration.tokens", base=BatchedTask,
          max_batch_size=16, wait_ms=100)
def tokens(texts: list[str], lowercase: list[bool] = True) -> list[object]:
    # A default is filled in per item: an item sent without lowercase gets True.
    out: list[object] = []
    for text, lower in zip(texts, lowercase):
        try:
            out.append(tokens_of(text, lower))
        except ValueError as exc:
            out.append(exc)  # this item alone ends FAILURE
    return out

