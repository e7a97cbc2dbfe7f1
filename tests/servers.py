"""Servers of a test's own, for fault tests that stop, kill or disconnect them.

The shared Redis (6379) and RabbitMQ vhost ``/`` serve every test and every developer on the
machine: a test that kills connections or stops a server starts its own instead -- a
``redis-server`` on a free port, a RabbitMQ vhost -- and removes it afterwards.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

import redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A ``redis-server`` on a free port; ``persistent`` keeps data across ``restart`` (AOF)."""

    def __init__(self, workdir: Path, persistent: bool = False, *extra_args: str) -> None:
        self.port = free_port()
        self.dir = workdir / f"redis-{self.port}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.persistent = persistent
        self.extra_args = extra_args
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def client(self, db: int = 0) -> redis.Redis:
        return redis.Redis(port=self.port, db=db)

    def start(self) -> RedisServer:
        persistence = (["--appendonly", "yes", "--appendfsync", "always"] if self.persistent
                       else ["--appendonly", "no"])
        self.proc = subprocess.Popen(
            [shutil.which("redis-server") or "redis-server", "--port", str(self.port),
             "--bind", "127.0.0.1", "--save", "", "--dir", str(self.dir), *persistence,
             *self.extra_args],
            stdout=(self.dir / "server.log").open("ab"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if self.client().ping():
                    return self
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server on {self.port} did not start")

    def stop(self) -> None:
        """Kill the server (no goodbye to its clients: they see a dropped connection)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def restart(self) -> None:
        self.stop()
        self.start()

    def connections_received(self) -> int:
        return int(self.client().info("stats")["total_connections_received"])


class RabbitVhost:
    """A RabbitMQ vhost of the test's own (guest may use it), deleted afterwards."""

    def __init__(self) -> None:
        self.name = f"test-{uuid.uuid4().hex[:8]}"

    def url(self) -> str:
        return f"pyamqp://guest:guest@127.0.0.1:5672/{self.name}"

    def create(self) -> RabbitVhost:
        _ctl("add_vhost", self.name)
        _ctl("set_permissions", "-p", self.name, "guest", ".*", ".*", ".*")
        return self

    def delete(self) -> None:
        _ctl("delete_vhost", self.name)

    def close_connections(self) -> None:
        _ctl("close_all_connections", "--vhost", self.name, "test: dropping this vhost's connections")

    def unacked(self, queue: str) -> int:
        out = _ctl("-q", "list_queues", "-p", self.name, "name", "messages_unacknowledged")
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0] == queue:
                return int(parts[1])
        return 0


def _ctl(*args: str) -> str:
    return subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, text=True,
                          timeout=60).stdout
