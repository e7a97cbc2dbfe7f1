"""The package is releasable: ``python -m build`` makes an sdist and a wheel that
``twine check --strict`` passes (the README renders on PyPI), with complete metadata whose version
comes from ``celery_batched.__version__`` alone."""

from __future__ import annotations

import email
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest
import trove_classifiers

import celery_batched

from .workers import ROOT


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    # --no-isolation: the build backend from the project's own virtualenv (docs extra), so the
    # test needs no download; `make dist` builds isolated, as a release would.
    proc = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--sdist", "--wheel",
                           "--outdir", str(out), str(ROOT)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_twine_check_strict_passes(dist: Path) -> None:
    files = sorted(str(p) for p in dist.iterdir())
    assert len(files) == 2, files
    proc = subprocess.run([sys.executable, "-m", "twine", "check", "--strict", *files],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("PASSED") == 2, proc.stdout


def test_wheel_metadata_is_complete(dist: Path) -> None:
    (wheel,) = dist.glob("*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        (meta_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        meta = email.message_from_bytes(zf.read(meta_name))
    assert meta["Name"] == "celery-batched"
    assert meta["Version"] == celery_batched.__version__
    assert wheel.name.startswith(f"celery_batched-{celery_batched.__version__}-")
    assert meta["Requires-Python"] == ">=3.11"
    assert meta["License-Expression"] == "MIT"
    assert meta["Description-Content-Type"] == "text/markdown"
    assert meta.get_payload().startswith("# celery-batched")  # the README is the long description
    requires = meta.get_all("Requires-Dist")
    assert any(r.startswith("celery<5.8,>=5.6.3") or r.startswith("celery>=5.6.3,<5.8") for r in requires), requires
    classifiers = meta.get_all("Classifier")
    assert {"Framework :: Celery", "Programming Language :: Python :: 3.11",
            "Typing :: Typed"} <= set(classifiers)
    assert not set(classifiers) - trove_classifiers.classifiers, "classifiers PyPI would refuse"
    provides = set(meta.get_all("Provides-Extra"))
    assert {"msgpack", "metrics", "docs", "dev"} <= provides
    assert "celery_batched/py.typed" in names
    assert any(n.endswith("licenses/LICENSE") for n in names), "the license text ships"


def test_the_version_has_one_source() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "celery_batched.__version__"}


def test_sdist_carries_the_readme_changelog_and_license(dist: Path) -> None:
    (sdist,) = dist.glob("*.tar.gz")
    with tarfile.open(sdist) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    assert {"README.md", "CHANGELOG.md", "LICENSE", "pyproject.toml", "celery_batched/__init__.py"} <= names
