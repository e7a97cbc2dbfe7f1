from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from .servers import RedisServer
from .workers import Worker

REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/11")
AMQP_URL = os.environ.get("TEST_AMQP_URL", "pyamqp://guest:guest@127.0.0.1:5672//")


@pytest.fixture
def redis_client() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture
def queue() -> str:
    """A queue name of this test's own, so leftovers of another test never reach it."""
    return f"q{uuid.uuid4().hex[:10]}"


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator:
    """``start_worker(app_module, queues=..., pool=..., concurrency=..., env=...)`` -> Worker."""
    workers: list[Worker] = []

    def start(app_module: str, **kwargs) -> Worker:
        worker = Worker(app_module, log_dir=tmp_path, **kwargs)
        workers.append(worker)
        return worker.start()

    yield start
    for worker in workers:
        worker.close()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator:
    """``private_redis(persistent=False, *args)`` -> a started RedisServer of this test's own,
    stopped at the end of the test whatever happens."""
    servers: list[RedisServer] = []

    def start(persistent: bool = False, *extra_args: str) -> RedisServer:
        server = RedisServer(tmp_path, persistent, *extra_args).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def pytest_runtest_makereport(item, call):  # noqa: ANN001, ANN201
    """On failure, show the logs of the test's workers."""
    if call.when == "call" and call.excinfo is not None:
        tmp = item.funcargs.get("tmp_path")
        if tmp is not None:
            for log in sorted(Path(tmp).glob("*.log")):
                item.add_report_section("call", f"worker log {log.name}", log.read_text(errors="replace")[-6000:])


def pytest_terminal_summary(terminalreporter, exitstatus, config):  # noqa: ANN001, ANN201
    from . import report
    if report.ROWS:
        terminalreporter.write_sep("=", "fault-injection tally")
        terminalreporter.write_line(report.table())
