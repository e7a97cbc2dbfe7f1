"""The example tasks. All of them are routed to the ``gpu`` queue (see ``celery_app``).

* ``batch_add`` -- the seed example: a batched function over lists; it logs each batch's
  inputs at INFO (the demo shows them).
* ``embed`` -- a class-based batched task: one forward pass of all-MiniLM-L6-v2 per batch
  (float16 on a GPU, float32 on the CPU); it returns the batch's NumPy array, one row per item.
  ``EXAMPLE_EMBED_BATCH_SIZE`` (default 32) sets its ``max_batch_size`` when this module is
  imported: a GPU wants bigger batches (128) than a CPU. ``EXAMPLE_EMBED_MAX_BACKLOG`` (default
  10,000) is its ``max_backlog``: past it the API answers 429 with ``Retry-After``.
* ``embed_bucketed`` -- ``embed`` with length buckets (``batch_key``): short and long texts
  never share a forward pass, so short ones aren't padded to the longest.
* ``embed_one`` -- an ordinary task, one forward pass per item: the baseline ``embed`` beats.
"""

from __future__ import annotations

import os
from typing import Any

from celery.utils.log import get_task_logger

from celery_batched import BatchedTask

from .celery_app import app
from .model import encode, encode_array, get_model

#: ``embed``'s max_batch_size: 32 suits a CPU; set 128 for a GPU.
EMBED_BATCH_SIZE = int(os.environ.get("EXAMPLE_EMBED_BATCH_SIZE") or 32)
#: ``embed``'s max_backlog: messages waiting in the queue past which producers refuse items.
EMBED_MAX_BACKLOG = int(os.environ.get("EXAMPLE_EMBED_MAX_BACKLOG") or 10_000)

logger = get_task_logger(__name__)


@app.task(base=BatchedTask, name="example_project.batch_add", max_batch_size=2, wait_ms=1000)
def batch_add(xs: list[int], ys: list[int]) -> list[Any]:
    """``batch_add.delay(1, 300).get() == 301``; the worker calls it with one list per parameter.

    An item that isn't two integers fails alone (its own ``TypeError``); the rest of its batch
    is added up.
    """
    logger.info("batch_add ran on xs=%s ys=%s", xs, ys)
    return [x + y if _is_int(x) and _is_int(y) else
            TypeError(f"batch_add adds integers, got x={x!r:.40} ({type(x).__name__}) and "
                      f"y={y!r:.40} ({type(y).__name__})") for x, y in zip(xs, ys)]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def invalid_text(text: object) -> Exception | None:
    """Why one item can't be embedded, or None: a bad item fails alone instead of making the
    model raise for its whole batch (and every neighbour fail with it)."""
    if not isinstance(text, str):
        return TypeError(f"embed takes a text (str), got {type(text).__name__}: {text!r:.60}")
    if not text.strip():
        return ValueError("embed takes a non-empty text, got an empty or blank string")
    return None


class Embed(BatchedTask):
    """``embed.delay("some text").get()`` -> that text's 384 floats (unit length)."""

    name = "example_project.embed"
    max_batch_size = EMBED_BATCH_SIZE
    wait_ms = 20
    max_backlog = EMBED_MAX_BACKLOG

    model: Any = None

    def setup(self) -> None:
        # Once per worker process, before its first batch: the model stays loaded after that.
        self.model = get_model(fp16=True)  # float16 on CUDA; the CPU stays float32

    def run(self, texts: list[str]) -> Any:
        # One row per text; the worker turns the rows into each item's list of floats.
        errors = [invalid_text(t) for t in texts]
        if not any(errors):
            return encode_array(self.model, texts)
        good = [t for t, e in zip(texts, errors) if e is None]
        rows = iter(encode_array(self.model, good).tolist() if good else ())
        return [e if e is not None else next(rows) for e in errors]


embed = app.register_task(Embed())


def length_bucket(text: str) -> int:
    """Buckets of 64 characters (about 16 tokens), the last one open-ended."""
    return min(len(text) // 64, 7)


class EmbedBucketed(Embed):
    """``embed`` whose batches hold texts of one length bucket each."""

    name = "example_project.embed_bucketed"
    batch_key = length_bucket


embed_bucketed = app.register_task(EmbedBucketed())


@app.task(name="example_project.embed_one")
def embed_one(text: str) -> list[float]:
    """The same model, one text per task: the one-by-one baseline."""
    return encode(get_model(), [text])[0]
