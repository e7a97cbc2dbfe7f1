"""``python -m example_project.demo``: celery-batched end to end, with a real worker.

1. The seed example: three ``batch_add`` items sent at once to a task with
   ``max_batch_size=2, wait_ms=1000`` run as two executions, ``[1, 2] + [300, 200]`` and
   ``[3] + [100]``, and each caller still gets its own sum.
2. Sentence embeddings with all-MiniLM-L6-v2: a few hundred sentences through the batched
   ``embed`` task, then some of them one by one through the ordinary ``embed_one`` task, with the
   batch sizes the worker ran and the items/s of both.

No server is needed: unless ``CELERY_BROKER_URL`` / ``CELERY_RESULT_BACKEND`` are set (to a Redis,
say -- then those are used), the broker is kombu's filesystem transport (as
``filesystem-atomic://``, which writes each message atomically: see ``fs_transport``) and results
go to Celery's ``file://`` backend, both in a temporary directory that is removed at the end. The demo
starts ``celery -A example_project worker -Q gpu -P prefork -c 1`` as a subprocess with the same
environment, and stops it when done, on errors and on Ctrl-C.

Options: ``--sentences N`` (batched, default 256), ``--one-by-one N`` (default 64),
``--keep`` (keep the temporary directory and the worker's log).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from celery import states
from kombu.exceptions import DecodeError

import celery_batched

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SEED_ITEMS = [(1, 300), (2, 200), (3, 100)]
WORKER_READY_TIMEOUT = 60.0
RESULT_TIMEOUT = 120.0


# --------------------------------------------------------------------------- output helpers

def say(text: str = "") -> None:
    print(text, flush=True)


def step(title: str) -> None:
    say()
    say(f"== {title}")


class Progress:
    """A one-line counter: redrawn in place on a terminal, a single final line otherwise."""

    def __init__(self, label: str, total: int) -> None:
        self.label, self.total = label, total
        self.tty = sys.stdout.isatty()
        self.shown = -1

    def update(self, done: int) -> None:
        if self.tty and done != self.shown:
            self.shown = done
            print(f"\r   {self.label}: {done}/{self.total}", end="", flush=True)

    def finish(self, suffix: str) -> None:
        if self.tty:
            print("\r" + " " * (len(self.label) + 20) + "\r", end="")
        say(f"   {self.label}: {self.total}/{self.total} {suffix}")


# --------------------------------------------------------------------------- broker set-up

def configure_environment(workdir: Path) -> str:
    """Point CELERY_* at a filesystem broker and file backend under ``workdir``, unless set.

    Returns a description of the broker and backend in use.
    """
    if os.environ.get("CELERY_BROKER_URL") or os.environ.get("CELERY_RESULT_BACKEND"):
        from .celery_app import DEFAULT_URL
        broker = os.environ.get("CELERY_BROKER_URL") or DEFAULT_URL
        backend = os.environ.get("CELERY_RESULT_BACKEND") or DEFAULT_URL
        return f"broker {_redact(broker)}, results {_redact(backend)} (from the environment)"
    queue_dir = workdir / "queue"
    for sub in ("queue", "processed", "control", "results"):
        (workdir / sub).mkdir(parents=True, exist_ok=True)
    # kombu's filesystem transport, writing messages atomically (see example_project.fs_transport).
    os.environ["CELERY_BROKER_URL"] = "filesystem-atomic://"
    os.environ["CELERY_RESULT_BACKEND"] = f"file://{workdir / 'results'}"
    os.environ["CELERY_BROKER_TRANSPORT_OPTIONS"] = json.dumps({
        # One folder for messages in and out: every process reads and writes the same queue.
        "data_folder_in": str(queue_dir),
        "data_folder_out": str(queue_dir),
        "processed_folder": str(workdir / "processed"),
        "control_folder": str(workdir / "control"),  # exchange bindings (pidbox broadcast too)
        "polling_interval": 0.01,  # an empty queue is looked at again after 10 ms, not 1 s
    })
    return (f"broker filesystem-atomic:// (kombu's filesystem transport), results file://, "
            f"both under {workdir}: no server needed")


def _redact(url: str) -> str:
    return re.sub(r"//([^:/@]*):[^@/]*@", r"//\1:***@", url)


# --------------------------------------------------------------------------- the worker

class DemoWorker:
    """``celery -A example_project worker -Q gpu -P prefork -c 1`` in its own process group.

    Its output goes to ``log_path``; the lines the tasks print (``batch_add ran on ...``) and any
    error lines are also kept for the demo to show.
    """

    def __init__(self, log_path: Path) -> None:
        self.hostname = f"demo-{os.getpid()}@{socket.gethostname()}"
        self.log_path = log_path
        self.cmd = [sys.executable, "-m", "celery", "-A", "example_project", "worker",
                    "-Q", "gpu", "-P", "prefork", "-c", "1", "-n", self.hostname,
                    "--without-mingle", "--without-gossip", "--loglevel=INFO"]
        self.proc: subprocess.Popen[str] | None = None
        self.ready = threading.Event()
        self.printed: list[str] = []   # lines the tasks printed
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._reader: threading.Thread | None = None

    def start(self) -> float:
        started = time.monotonic()
        env = {**os.environ, "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": os.pathsep.join(p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH")) if p)}
        self.proc = subprocess.Popen(
            self.cmd, cwd=PROJECT_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, errors="replace", bufsize=1,
            start_new_session=True)  # Ctrl-C reaches the demo only; it stops the worker itself
        self._reader = threading.Thread(target=self._read, name="worker-output", daemon=True)
        self._reader.start()
        deadline = started + WORKER_READY_TIMEOUT
        while not self.ready.wait(0.05):
            if self.proc.poll() is not None:
                raise RuntimeError(f"the worker exited with status {self.proc.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the worker wasn't ready after {WORKER_READY_TIMEOUT:.0f}s")
        return time.monotonic() - started

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        with open(self.log_path, "a", encoding="utf-8") as log:
            for line in self.proc.stdout:
                log.write(line)
                log.flush()
                text = line.rstrip("\n")
                if " ready." in text:
                    self.ready.set()
                marker = text.find("batch_add ran on")
                with self._lock:
                    if marker >= 0:
                        self.printed.append(text[marker:])
                    elif re.search(r"\b(ERROR|CRITICAL)\b", text):
                        self.errors.append(text)

    def printed_lines(self, prefix: str) -> list[str]:
        with self._lock:
            return [line for line in self.printed if line.startswith(prefix)]

    def stop(self, timeout: float = 15.0) -> int | None:
        """Warm shutdown (SIGTERM), then SIGKILL for the whole group if it hangs."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # leftover pool children, if any
        except (ProcessLookupError, PermissionError):
            pass
        code = proc.wait(5)
        if self._reader is not None:
            self._reader.join(2)
        return code

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no worker log)"


def batching_stats(app: Any, hostname: str) -> dict[str, Any] | None:
    """The worker's ``batching_stats`` remote-control reply, or None if none came."""
    return celery_batched.batching_stats(app, timeout=5.0, destination=[hostname]).get(hostname)


def sizes_of(stats: dict[str, Any] | None, task_name: str) -> Counter[int]:
    sizes = ((stats or {}).get(task_name) or {}).get("batch_sizes") or []
    return Counter({int(size): n for size, n in sizes})


# --------------------------------------------------------------------------- waiting for results

def gather(results: Sequence[Any], progress: Progress | None = None,
           timeout: float = RESULT_TIMEOUT) -> list[Any]:
    """Every result's value, in order, polling the backend every few milliseconds.

    ``AsyncResult.get`` would do, but it waits 0.5 s between polls of a polling backend such as
    ``file://``, and that backend can be read while a result file is half written (a
    ``DecodeError``: read again on the next poll).
    """
    values: list[Any] = []
    deadline = time.monotonic() + timeout
    while len(values) < len(results):
        result = results[len(values)]
        try:
            meta = result.backend.get_task_meta(result.id)
        except DecodeError:
            meta = {"status": states.PENDING}
        status = meta["status"]
        if status == states.SUCCESS:
            values.append(meta["result"])
            if progress is not None:
                progress.update(len(values))
            continue
        if status in states.PROPAGATE_STATES:
            raise RuntimeError(f"task {result.id} ended in {status}: {meta.get('result')!r}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no result for task {result.id} after {timeout:.0f}s ({status})")
        time.sleep(0.005)
    return values


# --------------------------------------------------------------------------- sentences

_SUBJECTS = ["The old lighthouse keeper", "A curious fox", "Our delivery drone", "The jazz quartet",
             "My neighbour's cat", "A tired software engineer", "The city council",
             "An enthusiastic chemistry teacher", "The night train to Vienna", "A small bakery",
             "The research submarine", "Grandma's vegetable garden", "A lonely satellite",
             "The football team", "An antique clock"]
_VERBS = ["quietly watched", "carefully repaired", "completely forgot about", "painted",
          "argued over", "discovered", "wrote a song about", "slowly approached", "photographed",
          "celebrated", "measured", "dreamed of"]
_OBJECTS = ["the stormy harbour", "a recipe for lemon cake", "the broken bicycle",
            "the northern lights", "an unfinished novel", "the stock market report",
            "a field of sunflowers", "the last train home", "a mysterious letter",
            "the quantum computer", "the village festival", "a pile of autumn leaves"]
_TAILS = ["", "", " before sunrise", " in the pouring rain", " for the third time this week",
          " while everyone else was asleep", " without telling anyone",
          " and then went back to bed", " with remarkable patience",
          " because nothing else seemed to matter that afternoon"]


def make_sentences(n: int, seed: int = 7) -> list[str]:
    """``n`` distinct, varied English sentences (deterministic)."""
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[str] = []
    while len(out) < n:
        sentence = (f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"
                    f"{rng.choice(_TAILS)}.")
        if sentence not in seen:
            seen.add(sentence)
            out.append(sentence)
    return out


# --------------------------------------------------------------------------- the two parts

def run_seed_example(app: Any, worker: DemoWorker) -> None:
    from .tasks import batch_add

    step("1/2  The seed example: batch_add(xs, ys), max_batch_size=2, wait_ms=1000")
    say("   sending " + ", ".join(f"batch_add.delay({x}, {y})" for x, y in SEED_ITEMS) + " at once")
    t0 = time.monotonic()
    results = [batch_add.delay(x, y) for x, y in SEED_ITEMS]
    sums = gather(results)
    elapsed = time.monotonic() - t0

    stats = batching_stats(app, worker.hostname)
    sizes = sizes_of(stats, batch_add.name)
    expected = sum(sizes.values()) or 2
    deadline = time.monotonic() + 3.0  # the worker's output may trail its results a little
    while len(worker.printed_lines("batch_add")) < expected and time.monotonic() < deadline:
        time.sleep(0.02)
    say("   the worker ran:")
    for line in worker.printed_lines("batch_add"):
        say(f"     | {line}")
    if stats is not None:
        n_batches = sum(sizes.values())
        runs = ", ".join(f"{n} x {size} item{'s' if size != 1 else ''}"
                         for size, n in sorted(sizes.items(), reverse=True))
        say(f"   batching_stats: {n_batches} executions for {sum(s * n for s, n in sizes.items())} "
            f"items ({runs})")
    else:
        say("   batching_stats: no reply from the worker")
    say("   each caller got its own result:")
    for (x, y), total in zip(SEED_ITEMS, sums):
        say(f"     {x} + {y} = {total}")
    say(f"   ({elapsed:.2f}s: the full pair ran at once, the lone third item after wait_ms)")
    if sums != [x + y for x, y in SEED_ITEMS]:
        raise RuntimeError(f"wrong sums: {sums}")


def timed_gather(label: str, task: Any, sentences: Sequence[str]) -> tuple[list[Any], float]:
    """Send one task per sentence, all at once, and wait for every result: (values, items/s)."""
    progress = Progress(label, len(sentences))
    t0 = time.monotonic()
    values = gather([task.delay(s) for s in sentences], progress)
    rate = len(sentences) / (time.monotonic() - t0)
    progress.finish(f"in {time.monotonic() - t0:.2f}s = {rate:,.0f} items/s")
    return values, rate


def run_embeddings(app: Any, worker: DemoWorker, n_batched: int, n_single: int) -> None:
    from .model import DIMENSIONS, MODEL_NAME
    from .tasks import embed, embed_one

    step(f"2/2  Sentence embeddings: {MODEL_NAME} (max_batch_size={embed.max_batch_size}, "
         f"wait_ms={embed.wait_ms:g})")
    say("   loading the model in the worker (setup(), once per worker process) ...")
    t0 = time.monotonic()
    gather([embed.delay("Warming up."), embed_one.delay("Warming up.")])
    say(f"   model ready in {time.monotonic() - t0:.1f}s")

    sentences = make_sentences(max(n_batched, n_single))
    before = sizes_of(batching_stats(app, worker.hostname), embed.name)

    vectors, batched_rate = timed_gather(
        f"embed        ({n_batched} sentences, sent at once)", embed, sentences[:n_batched])
    after_stats = batching_stats(app, worker.hostname)
    sizes = sizes_of(after_stats, embed.name) - before if after_stats is not None else None
    singles, single_rate = timed_gather(
        f"embed_one    ({n_single} sentences, one task each)", embed_one, sentences[:n_single])

    bad = [v for v in vectors + singles if len(v) != DIMENSIONS]
    if bad:
        raise RuntimeError(f"got vectors of length {len(bad[0])}, expected {DIMENSIONS}")
    if sizes:
        hist = ", ".join(f"{n} x {size}" for size, n in sorted(sizes.items(), reverse=True))
        say(f"   batches embed ran: {sum(sizes.values())} for {n_batched} sentences ({hist})")
    else:
        say("   batches embed ran: (no batching_stats reply from the worker)")
    drift = max((sum((a - b) ** 2 for a, b in zip(u, v)) ** 0.5
                 for u, v in zip(vectors, singles)), default=0.0)
    say(f"   every vector: {DIMENSIONS} floats; batched vs one-by-one vectors differ by "
        f"at most {drift:.1e} (L2)")
    say(f"   batched: {batched_rate:,.0f} items/s   one by one: {single_rate:,.0f} items/s   "
        f"-> {batched_rate / single_rate:.1f}x")


# --------------------------------------------------------------------------- main

def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m example_project.demo",
        description="celery-batched end to end with a real worker: the seed example, then "
                    "sentence embeddings batched vs one by one. Needs no server unless "
                    "CELERY_BROKER_URL / CELERY_RESULT_BACKEND are set.")
    parser.add_argument("--sentences", type=int, default=256,
                        help="sentences embedded through the batched task (default 256)")
    parser.add_argument("--one-by-one", type=int, default=64, dest="one_by_one",
                        help="sentences embedded one task each, for comparison (default 64)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary directory (broker files, results, worker log)")
    args = parser.parse_args(argv)
    if args.sentences < 1 or args.one_by_one < 1:
        parser.error("--sentences and --one-by-one must be >= 1")

    started = time.monotonic()

    def terminate(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # a SIGTERM stops the worker too, like Ctrl-C

    signal.signal(signal.SIGTERM, terminate)
    workdir = Path(tempfile.mkdtemp(prefix="celery-batched-demo-"))
    say("celery-batched demo")
    say(f"   {configure_environment(workdir)}")

    # ``python -m`` imported example_project (and created its app) before this module ran:
    # apply the environment set above. The app hasn't connected to anything yet.
    from . import app, config_from_env
    app.conf.update(config_from_env())

    worker = DemoWorker(workdir / "worker.log")
    code = 1
    try:
        say(f"   starting: celery -A example_project worker -Q gpu -P prefork -c 1 -n {worker.hostname}")
        say(f"   worker ready in {worker.start():.1f}s")
        run_seed_example(app, worker)
        run_embeddings(app, worker, args.sentences, args.one_by_one)
        code = 0
    except KeyboardInterrupt:
        say("\ninterrupted")
        code = 130
    except Exception as exc:
        say(f"\nerror: {type(exc).__name__}: {exc}")
        for line in worker.errors[-5:]:
            say(f"   worker | {line}")
        say(f"--- last lines of the worker's log ({worker.log_path}) ---\n{worker.log_tail()}")
    finally:
        say()
        say("stopping the worker ...")
        try:
            status = worker.stop()
        except KeyboardInterrupt:
            status = None
        say(f"   stopped (exit status {status})")
        if args.keep or code not in (0, 130):
            say(f"   kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if code == 0:
        say(f"done in {time.monotonic() - started:.1f}s")
    return code


if __name__ == "__main__":
    sys.exit(main())
