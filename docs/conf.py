"""Sphinx configuration of the celery-batched documentation (``make docs``).

Why Sphinx + MyST-Parser + furo: it is what Celery itself and its ecosystem (kombu, Flower,
django-celery-results, celery-batches) publish with, so the API reference is Sphinx autodoc of
the same docstrings users see in ``help()``, and our pages read like the Celery docs they sit
next to. MyST lets the pages stay Markdown (as the README was, so sections moved here unchanged)
while keeping Sphinx's cross-references, ``literalinclude`` and strict checking; furo is a plain,
readable theme with a sidebar table of contents and no JavaScript build of its own.

The build is strict (``sphinx-build -W -n --keep-going``, see the Makefile): a broken link, an
unresolved reference or a missing included file fails it. Nothing is fetched while building
(no intersphinx: CI has no network but the package index), so references to *other* projects'
objects (Celery's ``Task``, ``typing``'s names) are not resolvable and are ignored by pattern
below; every reference to ``celery_batched``'s public API must resolve (the two internal
classes its signatures name are listed below too).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import celery_batched  # noqa: E402  (after the path: the checkout, not an installed copy)

project = "celery-batched"
author = "celery-batched maintainers"
copyright = "2026, celery-batched maintainers"
release = celery_batched.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "examples"]

# [text](page.md#a-heading) links: anchors for headings down to ###.
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence", "deflist"]

autodoc_member_order = "bysource"
autodoc_typehints = "description"
# Members are listed on docs/api.md: BatchedTask inherits dozens of Celery attributes.
autodoc_default_options = {"show-inheritance": True}

# Other projects' objects (no intersphinx offline): Celery, kombu, the standard library's typing.
nitpick_ignore_regex = [
    ("py:.*", r"(celery|kombu|billiard|redis|typing|collections|types|enum|datetime)\..*"),
    ("py:.*", r"(AsyncResult|Any|Callable|Iterable|Iterator|Sequence|Mapping|Protocol|Final|Self|None|"
              r"Exception|BaseException|TypeError|ValueError|float|int|str|bool|dict|list|"
              r"tuple|object|type)"),
    # What observers receive (worker/batch.py), described on the monitoring page; annotated as
    # a string under TYPE_CHECKING, so autodoc can't resolve it to the module.
    ("py:class", "Batch"),
    # Celery's consumer, and the worker-side service BatchingStep builds: internal, not in
    # celery_batched.__all__, so not on the API page.
    ("py:class", "Consumer"),
    ("py:class", "Celery"),
    ("py:class", "celery_batched.worker.service.BatchingService"),
]

html_theme = "furo"
html_title = f"celery-batched {release}"
html_static_path: list[str] = []
