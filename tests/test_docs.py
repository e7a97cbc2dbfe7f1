"""The documentation can't drift from the code.

* Every runnable example (``docs/examples/``) runs, and every one is shown by a page.
* Every inline Python block of the docs and the README compiles, and what it imports from
  ``celery_batched`` exists.
* Every exception class ``celery_batched`` defines is on the troubleshooting page, and every
  public name on the API page.
* The README stays short, its links resolve, and its set-up commands are Makefile targets.
* The changelog's newest entry is the package's version.

The site's own build (``make docs``: Sphinx, strict) is run by ``.ci/run``; a broken link or
reference fails it there.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest
from celery import Task

import celery_batched
from celery_batched.spec import DEFAULTS

from .workers import ROOT

DOCS = ROOT / "docs"
EXAMPLES = DOCS / "examples"
PAGES = sorted(DOCS.glob("*.md"))


def _example_id(path: Path) -> str:
    return path.name


@pytest.mark.parametrize("example", sorted(EXAMPLES.glob("*.py")), ids=_example_id)
def test_every_docs_example_runs(example: Path, tmp_path: Path) -> None:
    """Scripts run with python (they assert their own output); test files run with pytest, as
    the page tells readers to run them."""
    script = tmp_path / example.name
    script.write_text(example.read_text())
    if example.name.startswith("test_"):
        cmd = [sys.executable, "-m", "pytest", "-p", "no:celery", "-p", "celery.contrib.pytest",
               "-p", "no:cacheprovider", "--timeout=120", "-q", "-rA", script.name]
    else:
        cmd = [sys.executable, script.name]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    if example.name.startswith("test_"):
        n_tests = len(re.findall(r"^def test_", example.read_text(), re.M))
        assert f"{n_tests} passed" in proc.stdout, proc.stdout[-4000:]


def test_every_docs_example_is_shown_by_a_page() -> None:
    shown = set()
    for page in PAGES:
        shown |= set(re.findall(r"```\{literalinclude\} examples/(\S+)", page.read_text()))
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(shown), \
        "an example that no page shows, or a page showing an example that doesn't exist"


def _python_blocks(path: Path) -> list[tuple[int, str]]:
    text = path.read_text()
    return [(text.count("\n", 0, m.start()) + 1, m.group(1))
            for m in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M)]


INLINE = [(p, line, code) for p in [ROOT / "README.md", *PAGES] for line, code in _python_blocks(p)]


@pytest.mark.parametrize("path,line,code", INLINE,
                         ids=[f"{p.name}:{line}" for p, line, _ in INLINE])
def test_inline_python_blocks_compile_and_import_what_exists(path: Path, line: int,
                                                             code: str) -> None:
    """Inline blocks are fragments (they assume your app and model), so they are not run; they
    must still be Python, and use only names celery_batched has."""
    tree = ast.parse(code, filename=f"{path.name}:{line}")
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("celery_batched"):
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{path.name}:{line}: {node.module}.{alias.name}"
        # @app.task(base=BatchedTask, <options>): each option is a batching option or Celery's.
        if isinstance(node, ast.Call) and any(
                k.arg == "base" and isinstance(k.value, ast.Name) and k.value.id == "BatchedTask"
                for k in node.keywords):
            for k in node.keywords:
                assert k.arg in DEFAULTS or k.arg in ("base", "queue") or hasattr(Task, k.arg), \
                    f"{path.name}:{line}: no task option {k.arg!r}"


def test_the_docs_have_inline_python_blocks_to_check() -> None:
    assert len(INLINE) >= 8 and {p.name for p, _, _ in INLINE} >= {"README.md", "writing-tasks.md"}


def _defined_exceptions() -> set[str]:
    names = set()
    for info in pkgutil.walk_packages(celery_batched.__path__, "celery_batched."):
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if (inspect.isclass(obj) and issubclass(obj, BaseException)
                    and obj.__module__ == module.__name__):
                names.add(name)
    return names


def test_every_exception_is_on_the_troubleshooting_page() -> None:
    defined = _defined_exceptions()
    assert {"CeleryBatchedError", "BulkPublishError", "ItemDecodeError"} <= defined
    page = (DOCS / "troubleshooting.md").read_text()
    documented = set(re.findall(r"^### `(\w+)`$", page, re.M))
    assert sorted(defined - documented) == [], "exceptions the troubleshooting page lacks"
    assert sorted(documented - defined) == [], "the page documents exceptions that don't exist"
    for name in defined:  # each with its message and a fix
        section = page.split(f"### `{name}`", 1)[1].split("\n### ", 1)[0]
        assert name == "CeleryBatchedError" or ("```text" in section and "Fix:" in section), name


def test_every_public_name_is_on_the_api_page() -> None:
    page = (DOCS / "api.md").read_text()
    documented = set(re.findall(r"^\.\. auto(?:class|function|exception):: celery_batched\.(\w+)$",
                                page, re.M))
    assert sorted(set(celery_batched.__all__) - documented) == []


def test_readme_is_a_front_page_whose_links_resolve() -> None:
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    links = re.findall(r"\]\(([^)#\s]+)(?:#([^)\s]+))?\)", text)
    local = [(target, anchor) for target, anchor in links if "://" not in target]
    assert local, "the README links into the docs"
    for target, anchor in local:
        assert (ROOT / target).exists(), target
        if anchor:
            headings = re.findall(r"^#+ (.+)$", (ROOT / target).read_text(), re.M)
            slugs = {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-") for h in headings}
            assert anchor in slugs, f"{target}#{anchor}"
    # Every page of the site is reachable from the README.
    assert {p.name for p in PAGES} - {"index.md"} <= {Path(t).name for t, _ in local} | {"changelog.md"}


def test_readme_set_up_commands_are_makefile_targets() -> None:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Set-up: two commands\n\n```bash\n(.*?)```", readme, re.S)
    assert block, "the README's set-up block"
    commands = re.findall(r"^make (\w[\w-]*)", block.group(1), re.M)
    assert commands == ["demo", "test"]
    makefile = (ROOT / "Makefile").read_text()
    for target in [*commands, "docs"]:
        assert re.search(rf"^{target}:", makefile, re.M), target
    assert re.search(r"^docs:.*\n\t.*sphinx -W -n --keep-going", makefile, re.M), \
        "make docs builds strictly"


def test_changelog_newest_entry_is_the_package_version() -> None:
    text = (ROOT / "CHANGELOG.md").read_text()
    entries = re.findall(r"^## \[([^\]]+)\](?: - (\S+))?$", text, re.M)
    assert entries, "Keep a Changelog entries: ## [version] - date"
    newest = [v for v, _ in entries if v != "Unreleased"][0]
    assert newest == celery_batched.__version__
    for version, date in entries:
        if version != "Unreleased":
            assert date == "Unreleased" or re.fullmatch(r"\d{4}-\d{2}-\d{2}", date or ""), version
