#!/usr/bin/env python3
"""Write the image's lock files, ``requirements/*.txt``, with a hash for every wheel.

    .venv/bin/python scripts/compose_lock.py                     # torch+cpu from its own index
    .venv/bin/python scripts/compose_lock.py --torch-cpu-links /opt/wheels     # or a folder

What it pins: the runtime dependencies of ``celery-batched[example,msgpack]`` (pyproject.toml)
and ``setuptools`` (the image builds the package without build isolation, so nothing unpinned
is fetched), at the versions installed in ``.venv`` -- the ones the test suite ran with -- and
whatever else they need, for the image's platform: CPython 3.11 on linux/amd64 with glibc 2.36
(``python:3.11-slim-bookworm``). It asks pip to resolve (``pip install --dry-run --report``,
nothing is installed), twice: with the CPU build of torch and with the CUDA build from PyPI.

* ``requirements/app.txt`` -- everything but torch and its CUDA libraries (both variants);
* ``requirements/torch-cpu.txt`` -- ``torch==X+cpu``, from download.pytorch.org's CPU index;
* ``requirements/torch-cuda.txt`` -- ``torch==X`` from PyPI and the ``nvidia-*``/``triton``
  wheels it needs (the CUDA runtime as wheels: the host only needs the NVIDIA driver). PyPI's
  torch 2.13 is built for CUDA 13 (driver >= 580); for an older driver take the CUDA 12.8 build,
  ``--torch-cuda-links https://download.pytorch.org/whl/cu128/torch/ --torch-cuda-local cu128``.

The Dockerfile installs app.txt, then one torch file, each with ``--require-hashes --no-deps``,
and runs ``pip check``. Exits non-zero when a resolution fails or the two disagree on a version.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV_PY = ROOT / ".venv" / "bin" / "python"
LOCK_DIR = ROOT / "requirements"
PYPI = "https://pypi.org/simple"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# python:3.11-slim-bookworm: glibc 2.36, so any manylinux tag up to 2_36 installs there.
PLATFORMS = [f"manylinux_2_{v}_x86_64" for v in range(36, 16, -1)] + ["manylinux2014_x86_64",
                                                                     "linux_x86_64"]
TARGET = ["--python-version", "3.11", "--implementation", "cp", "--abi", "cp311",
          "--only-binary=:all:", *(a for p in PLATFORMS for a in ("--platform", p))]
CUDA_ONLY = re.compile(r"^(nvidia-.*|triton|cuda-.*)$")


def canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def roots() -> list[str]:
    """pyproject's runtime requirements with the example and msgpack extras, and its build
    requirements; torch is left out (each resolution names its own build)."""
    from packaging.requirements import Requirement

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extras = pyproject["project"]["optional-dependencies"]
    reqs = [*pyproject["project"]["dependencies"], *extras["example"], *extras["msgpack"],
            *pyproject["build-system"]["requires"]]
    return [r for r in reqs if canon(Requirement(r).name) != "torch"]


def tested_versions() -> dict[str, str]:
    """``{name: version}`` installed in .venv, which the test suite runs with."""
    out = subprocess.run([str(VENV_PY), "-m", "pip", "freeze", "--all", "--exclude-editable"],
                         check=True, capture_output=True, text=True).stdout
    pins = {}
    for line in out.splitlines():
        name, sep, version = line.partition("==")
        if sep and canon(name) not in ("pip", "setuptools", "wheel"):  # the venv's own tools
            pins[canon(name)] = version
    return pins


def resolve(reqs: list[str], constraints: dict[str, str], links: list[str]) -> dict[str, tuple[str, str, str]]:
    """``{name: (version, sha256, url)}`` pip would install on the target platform."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") or k in ("PIP_CERT",)}
    env["PIP_CONFIG_FILE"] = os.devnull  # this machine's pip.conf (local mirrors) must not leak in
    with tempfile.TemporaryDirectory() as tmp:
        cfile, report = Path(tmp) / "constraints.txt", Path(tmp) / "report.json"
        cfile.write_text("".join(f"{n}=={v}\n" for n, v in sorted(constraints.items())))
        cmd = [str(VENV_PY), "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
               "--disable-pip-version-check", "--report", str(report), "--index-url", PYPI,
               *(a for link in links for a in ("--find-links", link)), *TARGET,
               "-c", str(cfile), *reqs]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"pip could not resolve {' '.join(reqs)}:\n{proc.stderr[-4000:]}")
        items = json.loads(report.read_text())["install"]
    out = {}
    for item in items:
        info = item["download_info"]
        sha = info.get("archive_info", {}).get("hashes", {}).get("sha256")
        if not sha:
            sys.exit(f"no sha256 for {info['url']}")
        out[canon(item["metadata"]["name"])] = (item["metadata"]["version"], sha, info["url"])
    return out


def write(path: Path, pins: dict[str, tuple[str, str, str]], header: str, options: str = "") -> None:
    lines = [f"# {line}".rstrip() for line in header.strip().splitlines()]
    lines += [options] if options else []
    for name, (version, sha, _) in sorted(pins.items()):
        lines.append(f"{name}=={version} \\\n    --hash=sha256:{sha}")
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path.relative_to(ROOT)}: {len(pins)} packages")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--torch-cpu-links", default=f"{TORCH_CPU_INDEX}/torch/",
                        help="where the torch+cpu wheel is listed: its index page (default) or a "
                             "folder holding the same wheel")
    parser.add_argument("--torch-cuda-links", default=None,
                        help="where a CUDA build of torch other than PyPI's is listed (default: "
                             "PyPI's build, CUDA 13)")
    parser.add_argument("--torch-cuda-local", default="",
                        help="that build's local version label, e.g. cu128")
    args = parser.parse_args()

    tested = tested_versions()
    torch_version = tested.pop("torch", "").split("+")[0]
    if not torch_version:
        sys.exit(f"torch is not installed in {VENV_PY.parent.parent}: run `make install` first")
    reqs = roots()
    cpu = resolve([*reqs, f"torch=={torch_version}+cpu"], tested, [args.torch_cpu_links])
    cuda_torch = f"torch=={torch_version}" + (f"+{args.torch_cuda_local}" if args.torch_cuda_local else "")
    cuda_links = [args.torch_cuda_links] if args.torch_cuda_links else []
    cuda = resolve([*reqs, cuda_torch], tested, cuda_links)

    app = {n: pin for n, pin in cpu.items() if n != "torch"}
    extra = {n: pin for n, pin in cuda.items() if n not in app}
    clashes = {n: (app[n][0], cuda[n][0]) for n in app if n in cuda and app[n][0] != cuda[n][0]}
    odd = sorted(n for n in extra if n != "torch" and not CUDA_ONLY.match(n))
    if clashes or odd:
        sys.exit(f"the CPU and CUDA resolutions disagree: versions {clashes}, CUDA-only {odd}")

    common = ("Generated by scripts/compose_lock.py; do not edit. Target: CPython 3.11, "
              "linux/amd64,\nglibc >= 2.36 (python:3.11-slim-bookworm); versions as in the .venv "
              "the tests ran with.\n")
    LOCK_DIR.mkdir(exist_ok=True)
    write(LOCK_DIR / "app.txt", app, common + "Everything the image needs but torch (the "
          "Dockerfile installs it with --no-deps, then one\nrequirements/torch-*.txt).")
    write(LOCK_DIR / "torch-cpu.txt", {"torch": cpu["torch"]}, common + "torch's CPU build; "
          "its dependencies are in app.txt.", options=f"--index-url {TORCH_CPU_INDEX}")
    runtime = cuda.get("nvidia-cuda-runtime") or cuda.get("nvidia-cuda-runtime-cu12")
    write(LOCK_DIR / "torch-cuda.txt", extra, common + "torch's CUDA build and the CUDA "
          f"libraries it needs as wheels (CUDA runtime {runtime[0] if runtime else '?'}); the "
          "host\nneeds only an NVIDIA driver that supports that CUDA version.",
          options="\n".join([f"--index-url {PYPI}", *(f"--find-links {link}" for link in cuda_links)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
