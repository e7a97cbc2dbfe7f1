"""One matrix cell, run: its servers, its worker, its workload, its fault, what became of it.

Servers are the cell's own wherever a fault strikes them: a private ``redis-server`` as result
backend (killed and restarted, or made to refuse writes), a Sentinel in front of a private
master, a RabbitMQ vhost, a PostgreSQL database. The runs and batch sizes the tasks record live
in the shared test Redis (db 11), which no fault touches.
"""

from __future__ import annotations

import gc
import itertools
import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
from celery import Celery, chord
from celery.result import AsyncResult
from kombu import Queue

from celery_batched import BatchedTask

from ..apps._common import batch_sizes
from ..conftest import REDIS_URL
from ..servers import NO_SCRIPTING, PostgresDatabase, RabbitVhost, RedisSentinel, RedisServer
from ..workers import Worker
from .cells import Cell

APP = "tests.apps.matrix"
MAX_BATCH_SIZE = 16
#: The Redis backends' retry policy in every cell: give up on a write after about 0.5 s.
REDIS_RETRY = {"max_retries": 3, "interval_start": 0, "interval_step": 0.25, "interval_max": 0.25}
#: The database backend's own retry settings, to about the same.
DB_RETRY = {"result_backend_max_retries": 3, "result_backend_base_sleep_between_retries_ms": 100,
            "result_backend_max_sleep_between_retries_ms": 250}
READY = {"SUCCESS", "FAILURE", "REVOKED"}


class Scenario:
    """Set up, run and tear down one cell."""

    def __init__(self, cell: Cell, tmp_path: Path, queue: str, record: redis.Redis,
                 start_worker: Callable[..., Worker]) -> None:
        self.cell, self.tmp, self.queue, self.record = cell, tmp_path, queue, record
        self._start_worker = start_worker
        self.cleanups: list[Callable[[], None]] = []
        self.items: list[tuple[str, int, AsyncResult]] = []
        self.unacked: list[int] = []
        self.worker: Worker | None = None
        self.chord_result: AsyncResult | None = None
        self.backend_server: RedisServer | None = None
        self.database: PostgresDatabase | None = None
        self._sampling = threading.Event()
        self.config: dict[str, Any] = {"queue": queue, "settings": {},
                                       "task_options": dict(cell.task_options)}

    # -- servers -------------------------------------------------------------------------

    def setup(self) -> None:
        cell, settings = self.cell, self.config["settings"]
        settings.update(cell.settings)
        if cell.broker == "redis":
            self.config["broker"] = REDIS_URL
            self._unacked = lambda: int(self.record.hlen("unacked"))
        elif cell.broker == "sentinel":
            sentinel = RedisSentinel(self.tmp, persistent=True).start()
            self.cleanups.append(sentinel.stop)
            self.config["broker"] = sentinel.url(0)
            settings["broker_transport_options"] = sentinel.transport_options()
            self._unacked = lambda: int(sentinel.client(0).hlen("unacked"))
            self.sentinel = sentinel
        else:  # rabbitmq, quorum
            vhost = RabbitVhost().create()
            self.cleanups.append(vhost.delete)
            self.config["broker"] = vhost.url()
            self.config["quorum"] = cell.broker == "quorum"
            self._unacked = lambda: vhost.unacked(self.queue)
        if cell.backend == "redis":
            server = self.backend_server = RedisServer(
                self.tmp, True, scripting=cell.fault != "no-scripts").start()
            self.cleanups.append(server.stop)
            user = None
            if cell.fault == "backend-noperm":
                server.add_user("worker", "pw")
                user = "worker"
            elif cell.fault == "no-scripts-acl":
                server.add_user("worker", "pw", *NO_SCRIPTING)
                user = "worker"
            self.config["backend"] = server.url(0, user=user)
            settings["result_backend_transport_options"] = {"retry_policy": REDIS_RETRY}
        elif cell.backend == "sentinel":
            self.config["backend"] = self.sentinel.backend_url(1)
            settings["result_backend_transport_options"] = {
                **self.sentinel.transport_options(), "retry_policy": REDIS_RETRY}
        elif cell.backend in ("postgres", "psycopg3"):
            database = self.database = PostgresDatabase().create()
            self.cleanups.append(database.drop)
            driver = "psycopg2" if cell.backend == "postgres" else "psycopg"
            self.config["backend"] = database.url(driver)
            settings.update(DB_RETRY)
        else:
            self.config["backend"] = "rpc://"
        # The client's own backend: the worker's, unless a fault stops it (a client can't even
        # send while its Redis result subscriptions fail). States are read from the worker's.
        client_backend = self.config["backend"] if cell.fault is None else REDIS_URL
        self.client = Celery("matrix-client", broker=self.config["broker"],
                             backend=client_backend)
        self.client.conf.update(
            task_serializer="json", result_serializer="json", accept_content=["json"],
            task_default_queue=self.queue,
            **{k: v for k, v in settings.items() if k.startswith("broker_")
               or k.startswith("result_backend") and cell.fault is None})
        if self.config.get("quorum"):
            self.client.conf.task_queues = [
                Queue(self.queue, queue_arguments={"x-queue-type": "quorum"}, durable=True)]
        self.cleanups.append(self.client.close)
        # The client's own definition of the batched task: map_items needs one.
        from ..apps.matrix import _OPTIONS, _run
        self.task = self.client.task(name=f"matrix.{cell.task}",
                                     **{**_OPTIONS, "base": BatchedTask})(_run)

    def teardown(self) -> None:
        self._sampling.set()
        if self.worker is not None:
            self.worker.kill()
        # The results unsubscribe when collected: while their backend still runs.
        self.items.clear()
        self.chord_result = None
        gc.collect()
        for cleanup in reversed(self.cleanups):
            try:
                cleanup()
            except Exception:
                pass

    # -- the run -------------------------------------------------------------------------

    def run(self) -> None:
        cell = self.cell
        if cell.fault_after == 0:
            self.fault(True)
        items = _interleave(cell.workload)
        if cell.backlog:
            self.send(items)
            self.start_worker()
            self._sample_unacked()
        elif cell.fault_after:
            # The items before the fault, then the rest once it struck: every one of those
            # meets it, however fast the first ones ran.
            self.start_worker()
            self.send(items[:cell.fault_after])
            deadline = time.monotonic() + 60
            while sum(self.runs().values()) < cell.fault_after:
                assert time.monotonic() < deadline, "the fault's moment never came"
                time.sleep(0.02)
            self.fault(True)
            self.send(items[cell.fault_after:])
        else:
            self.start_worker()
            self.send(items)
        if cell.fault in ("no-scripts", "no-scripts-acl") or cell.fault is None:
            return
        time.sleep(cell.fault_s)
        self.fault(False)

    def start_worker(self) -> None:
        env = {"MATRIX_CONFIG": json.dumps(self.config), "TEST_RECORD_URL": REDIS_URL}
        self.worker = self._start_worker(APP, queues=self.queue, pool=self.cell.pool,
                                         concurrency=self.cell.concurrency, env=env)

    def send(self, kinds: list[tuple[int, str]]) -> None:
        if self.cell.bulk:
            results = self.task.starmap_items([(kind, x) for x, kind in kinds], queue=self.queue)
            self.items += [(kind, x, r) for (x, kind), r in zip(kinds, results)]
            return
        chorded = [(x, kind) for x, kind in kinds if kind == "chord"]
        if chorded:
            header = [self.task.s("ok", x).set(queue=self.queue) for x, _ in chorded]
            self.chord_result = chord(header, app=self.client)(
                self.client.signature("matrix.total", queue=self.queue))
            self.items += [("chord", x, AsyncResult(sig.id, app=self.client))
                           for (x, _), sig in zip(chorded, self.chord_result.parent.results)]
            return
        with self.client.producer_or_acquire() as producer:
            for x, kind in kinds:
                options = {"expires": 1.0} if kind == "expire" else {}
                result = self.task.apply_async((kind, x), queue=self.queue, producer=producer,
                                               **options)
                self.items.append((kind, x, result))

    def fault(self, on: bool) -> None:
        """Start (``on``) or end the cell's fault."""
        kind, server, database = self.cell.fault, self.backend_server, self.database
        if kind is None or kind.startswith("no-scripts"):
            return
        if kind == "backend-down":
            assert server is not None
            server.stop() if on else server.start()
        elif kind.startswith("backend-"):
            assert server is not None
            if on:
                server.refuse_writes(kind.removeprefix("backend-"))  # type: ignore[arg-type]
            else:
                server.allow_writes()
        elif kind == "db-down":
            assert database is not None
            database.make_unreachable() if on else database.make_reachable()
        elif kind == "db-readonly":
            assert database is not None
            database.refuse_writes() if on else database.allow_writes()

    # -- what became of it ---------------------------------------------------------------

    def runs(self) -> dict[int, int]:
        return {int(k): int(v) for k, v in self.record.hgetall("runs").items()}

    def batch_sizes(self) -> list[int]:
        return batch_sizes(self.record)

    def calls(self) -> int:
        return int(self.record.llen("calls"))

    def states(self) -> dict[str, tuple[str, Any]]:
        """task id -> (state, result), read from the backend itself."""
        ids = [r.id for _, _, r in self.items]
        if self.cell.backend in ("redis", "sentinel"):
            client = (self.backend_server.client(0) if self.backend_server is not None
                      else self.sentinel.client(1))
            raw = client.mget([f"celery-task-meta-{i}" for i in ids])
            out = {}
            for task_id, value in zip(ids, raw):
                meta = json.loads(value) if value else {"status": "PENDING", "result": None}
                out[task_id] = (meta["status"], meta["result"])
            return out
        if self.database is not None:
            try:
                found = self.database.states()
            except Exception:  # unreachable for now
                found = {}
            return {i: (found.get(i, "PENDING"), None) for i in ids}
        return {r.id: (r.state, r.result if r.state == "SUCCESS" else None)
                for _, _, r in self.items}

    def wait_until_settled(self, timeout: float) -> dict[str, tuple[str, Any]]:
        """Every item's state once none is still on its way (the expected PENDING ones, of
        acks_late=False, once the log says so)."""
        expect_pending = {k for k, _ in self.cell.workload if "PENDING" in self.cell.states(k)}
        deadline = time.monotonic() + timeout
        if self.cell.backend == "rpc":
            from celery_batched.client.submit import ItemResults
            ItemResults([r for _, _, r in self.items], self.client).get(
                timeout=timeout, propagate=False)
        while True:
            states = self.states()
            waiting = [kind for kind, _, r in self.items
                       if states[r.id][0] not in READY and kind not in expect_pending]
            logged = all(line in self.worker_log() for line in self.cell.log_has)
            if not waiting and logged:
                if expect_pending:
                    time.sleep(1.0)  # an acknowledged item's state would have been stored by now
                    states = self.states()
                return states
            if time.monotonic() > deadline:
                summary = Counter((kind, states[r.id][0]) for kind, _, r in self.items)
                raise AssertionError(f"not settled after {timeout}s: {dict(summary)}; "
                                     f"log lines {self.cell.log_has} present: {logged}")
            time.sleep(0.1)

    def worker_log(self) -> str:
        return self.worker.log() if self.worker is not None else ""

    def _sample_unacked(self) -> None:
        """Sample unacknowledged messages in a thread until the backlog has run."""
        total = len(_interleave(self.cell.workload))

        def sample() -> None:
            while not self._sampling.is_set() and sum(self.runs().values()) < total * 0.9:
                try:
                    self.unacked.append(self._unacked())
                except Exception:
                    pass
                self._sampling.wait(0.05)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        self.cleanups.append(self._sampling.set)

    def stop_sampling(self) -> None:
        self._sampling.set()


def _interleave(workload: tuple[tuple[str, int], ...]) -> list[tuple[int, str]]:
    """The workload's items, kinds round-robin (so every batch mixes them), numbered from 1."""
    queues = [[kind] * n for kind, n in workload]
    order = [k for group in itertools.zip_longest(*queues) for k in group if k is not None]
    return list(enumerate(order, start=1))
