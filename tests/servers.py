"""Servers of a test's own, for fault tests that stop, kill or disconnect them.

The shared Redis (6379) and RabbitMQ vhost ``/`` serve every test and every developer on the
machine: a test that kills connections or stops a server starts its own instead -- a
``redis-server`` on a free port, a RabbitMQ vhost -- and removes it afterwards.

For the configuration x fault matrix (tests/matrix) there are also: a Redis Sentinel in front of a
private master (``RedisSentinel``), a PostgreSQL database of the test's own for Celery's database
result backend (``PostgresDatabase``), and write faults of a private Redis
(``RedisServer.refuse_writes``: out of memory, read-only replica, ACL without write permission).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any, Literal

import redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: What ``RedisServer.refuse_writes`` can do to a server; redis-py raises, on each refused write
#: (a plain command, a MULTI/EXEC pipeline's, or one inside a Lua script):
#: ``"oom"`` -> ``redis.exceptions.OutOfMemoryError``, ``"readonly"`` ->
#: ``redis.exceptions.ReadOnlyError``, ``"noperm"`` -> ``redis.exceptions.NoPermissionError``
#: (but a write *inside a Lua script* of a user without @write: ``redis.exceptions.ResponseError``
#: "The user executing the script can't run this command..."). All are ``ResponseError``
#: subclasses, none a ``ConnectionError``.
WriteFault = Literal["oom", "readonly", "noperm"]

#: The ACL rules of a user ``RedisServer.add_user`` makes by default: everything, like ``default``.
ALL_PERMISSIONS = ("~*", "&*", "+@all")
#: The rules of a user that may do everything but run Lua (EVAL, EVALSHA, SCRIPT, FCALL, ...).
NO_SCRIPTING = (*ALL_PERMISSIONS, "-@scripting")


class RedisServer:
    """A ``redis-server`` on a free port; ``persistent`` keeps data across ``restart`` (AOF).

    ``scripting=False`` starts it with EVAL and EVALSHA renamed away (``--rename-command EVAL ""``):
    every client's ``register_script(...)(...)`` then raises ``redis.exceptions.ResponseError``
    ("unknown command 'EVALSHA'"), the admin ``client()`` included. For a server where only the
    Celery worker's user may not run Lua, use ``add_user(..., *NO_SCRIPTING)`` instead (its
    scripts raise ``redis.exceptions.NoPermissionError``). Either way the server can only be a
    *result backend*: kombu's Redis transport needs Lua (its ``restore_visible`` mutex is a
    redis-py ``Lock``, released by EVALSHA), so a worker whose broker refuses scripts exits at
    startup ("Unrecoverable error: ResponseError / NoPermissionError ... 'evalsha'").

    ``add_user`` makes an ACL user (kept across ``restart``); ``url(user=...)`` connects as it.
    ``client()`` is always the ``default`` user, which no fault here restricts.
    """

    def __init__(self, workdir: Path, persistent: bool = False, *extra_args: str,
                 scripting: bool = True) -> None:
        self.port = free_port()
        self.dir = workdir / f"redis-{self.port}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.persistent = persistent
        self.extra_args = extra_args
        if not scripting:
            self.extra_args += ("--rename-command", "EVAL", "", "--rename-command", "EVALSHA", "")
        self.proc: subprocess.Popen[bytes] | None = None
        #: name -> (password, rules), applied again after each (re)start.
        self.users: dict[str, tuple[str, tuple[str, ...]]] = {}
        self.fault: WriteFault | None = None
        self._fault_user: str | None = None
        self._no_master: socket.socket | None = None

    def url(self, db: int = 0, user: str | None = None) -> str:
        """``redis://127.0.0.1:<port>/<db>``; with ``user``, as that ACL user (``add_user``)."""
        if user is None:
            return f"redis://127.0.0.1:{self.port}/{db}"
        return f"redis://{user}:{self.users[user][0]}@127.0.0.1:{self.port}/{db}"

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
                    for name, (password, rules) in self.users.items():
                        self._setuser(name, password, rules)
                    return self
            except redis.ConnectionError:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.05)
        self.stop()  # no server left behind by a failed start
        raise RuntimeError(f"redis-server on {self.port} did not start: "
                           f"{(self.dir / 'server.log').read_text(errors='replace')[-2000:]}")

    def stop(self) -> None:
        """Kill the server (no goodbye to its clients: they see a dropped connection)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.fault = self._fault_user = None  # a restart forgets CONFIG SET and REPLICAOF
        if self._no_master is not None:
            self._no_master.close()
            self._no_master = None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def restart(self) -> None:
        self.stop()
        self.start()

    def connections_received(self) -> int:
        return int(self.client().info("stats")["total_connections_received"])

    # -- ACL users ---------------------------------------------------------------------------

    def add_user(self, name: str = "worker", password: str = "pw", *rules: str) -> str:
        """An ACL user (``ALL_PERMISSIONS`` unless ``rules`` are given; ``NO_SCRIPTING``: no
        Lua); returns ``url(0, user=name)``. Re-applied after a restart."""
        self.users[name] = (password, tuple(rules) or ALL_PERMISSIONS)
        if self.running():
            self._setuser(name, password, self.users[name][1])
        return self.url(0, user=name)

    def _setuser(self, name: str, password: str, rules: tuple[str, ...]) -> None:
        # "reset" first: the user ends up with exactly these rules, whatever it had.
        self.client().execute_command("ACL", "SETUSER", name, "reset", "on", f">{password}", *rules)

    # -- write faults ------------------------------------------------------------------------

    def refuse_writes(self, kind: WriteFault, user: str = "worker") -> None:
        """Keep serving reads and connections but refuse writes, until ``allow_writes``.

        * ``"oom"``: ``maxmemory`` 1 byte with ``noeviction``: every command that may add memory
          (SET, SETEX, LPUSH, RPUSH, HSET, ..., EVAL of a writing script) gets ``-OOM`` ->
          ``redis.exceptions.OutOfMemoryError``; DEL, GET, PUBLISH, BRPOP, SUBSCRIBE still work.
          Every client is affected, ``client()`` included (use it to read, not to write).
        * ``"readonly"``: ``REPLICAOF`` a port this object holds bound but not listening (nothing
          can take it, so the server never syncs and keeps its data, serving it as stale data);
          writes get ``-READONLY`` -> ``redis.exceptions.ReadOnlyError``, every client's.
        * ``"noperm"``: ``ACL SETUSER <user> -@write``: that user's writes get ``-NOPERM`` ->
          ``redis.exceptions.NoPermissionError`` (a write inside its Lua script: ``ResponseError``).
          Only clients of ``url(user=user)`` are affected; ``add_user`` it first.
        """
        if self.fault is not None:
            self.allow_writes()
        client = self.client()
        if kind == "oom":
            client.config_set("maxmemory-policy", "noeviction")
            client.config_set("maxmemory", 1)
        elif kind == "readonly":
            self._no_master = socket.socket()
            self._no_master.bind(("127.0.0.1", 0))  # bound, never listening: connection refused
            client.execute_command("REPLICAOF", "127.0.0.1", self._no_master.getsockname()[1])
        elif kind == "noperm":
            if user not in self.users:
                raise ValueError(f"no ACL user {user!r}: add_user({user!r}) and connect with "
                                 f"url(user={user!r}) first")
            client.execute_command("ACL", "SETUSER", user, "-@write")
            self._fault_user = user
        else:
            raise ValueError(f"unknown write fault {kind!r}")
        self.fault = kind

    def allow_writes(self) -> None:
        """Undo ``refuse_writes`` (nothing written while refused is lost or replayed)."""
        client = self.client()
        if self.fault == "oom":
            client.config_set("maxmemory", 0)
        elif self.fault == "readonly":
            client.execute_command("REPLICAOF", "NO", "ONE")
            if self._no_master is not None:
                self._no_master.close()
                self._no_master = None
        elif self.fault == "noperm" and self._fault_user is not None:
            password, rules = self.users[self._fault_user]
            self._setuser(self._fault_user, password, rules)
        self.fault = self._fault_user = None


class RedisSentinel:
    """A private master ``redis-server`` and one Sentinel (``redis-server --sentinel``) that
    monitors it, each on a free port; Celery reaches the master through the Sentinel.

    Celery configuration (``celery_config()`` returns all four)::

        broker_url = "sentinel://127.0.0.1:<sentinel port>/<db>"
        broker_transport_options = {"master_name": <name>}
        result_backend = "sentinel://127.0.0.1:<sentinel port>/<db>"
        result_backend_transport_options = {"master_name": <name>}

    ``master`` is a ``RedisServer``: stop, restart, or ``refuse_writes`` it for faults (with a
    single master there is no failover: clients wait until it is back on the same port).
    """

    def __init__(self, workdir: Path, master_name: str = "mymaster", persistent: bool = False,
                 down_after_ms: int = 1000) -> None:
        self.master_name = master_name
        self.master = RedisServer(workdir, persistent)
        self.port = free_port()
        self.dir = workdir / f"sentinel-{self.port}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.down_after_ms = down_after_ms
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0) -> str:
        """The broker (or result backend) URL: ``sentinel://127.0.0.1:<sentinel port>/<db>``."""
        return f"sentinel://127.0.0.1:{self.port}/{db}"

    def backend_url(self, db: int = 1) -> str:
        return self.url(db)

    def transport_options(self) -> dict[str, Any]:
        """For ``broker_transport_options`` and ``result_backend_transport_options`` alike."""
        return {"master_name": self.master_name}

    def celery_config(self, broker_db: int = 0, backend_db: int = 1) -> dict[str, Any]:
        return {"broker_url": self.url(broker_db),
                "broker_transport_options": self.transport_options(),
                "result_backend": self.backend_url(backend_db),
                "result_backend_transport_options": self.transport_options()}

    def client(self, db: int = 0) -> redis.Redis:
        """A client on the master (directly, not through the Sentinel)."""
        return self.master.client(db)

    def sentinel_client(self) -> redis.Redis:
        return redis.Redis(port=self.port)

    def start(self) -> RedisSentinel:
        if not self.master.running():
            self.master.start()
        conf = self.dir / "sentinel.conf"  # Sentinel rewrites it: a file of its own, writable
        conf.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {self.dir}\n"
            f"sentinel monitor {self.master_name} 127.0.0.1 {self.master.port} 1\n"
            f"sentinel down-after-milliseconds {self.master_name} {self.down_after_ms}\n"
            f"sentinel failover-timeout {self.master_name} 10000\n")
        self.proc = subprocess.Popen(
            [shutil.which("redis-server") or "redis-server", str(conf), "--sentinel"],
            stdout=(self.dir / "sentinel.log").open("ab"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                # The master as Sentinel reports it to clients (redis-py checks the same flags).
                state: Any = self.sentinel_client().sentinel_master(self.master_name)
                if (state["is_master"] and not state["is_sdown"] and not state["is_odown"]
                        and not state["is_disconnected"]):
                    return self
            except redis.ConnectionError:
                if self.proc.poll() is not None:
                    break
            time.sleep(0.05)
        self.stop()  # neither the Sentinel nor the master left behind by a failed start
        raise RuntimeError(f"redis sentinel on {self.port} did not start: "
                           f"{(self.dir / 'sentinel.log').read_text(errors='replace')[-2000:]}")

    def stop(self) -> None:
        """Kill the Sentinel and the master."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.master.stop()


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


class PostgresDatabase:
    """A PostgreSQL database of the test's own on the machine's server, for Celery's database
    result backend; ``drop`` removes it (its sessions terminated first).

    Celery connects as ``postgres`` (trust auth). Faults, each undone by its pair:

    * ``make_unreachable``: ``ALLOW_CONNECTIONS false`` and its sessions terminated: every new
      connection fails (``database "..." is not currently accepting connections``) ->
      ``sqlalchemy.exc.OperationalError`` (psycopg2 / psycopg ``OperationalError``), a session
      cut mid-use as well (``AdminShutdown``). ``states()`` can't read it meanwhile.
    * ``refuse_writes``: ``default_transaction_read_only = on`` for the database, its sessions
      terminated so that the new ones start read-only: connecting and reading work, every
      INSERT/UPDATE raises ``sqlalchemy.exc.InternalError`` (``ReadOnlySqlTransaction``).

    Both SQLAlchemy errors are ``sqlalchemy.exc.DatabaseError``s: Celery's backend retries them
    (``result_backend_max_retries``, 3 by default for this backend) before raising.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 5432, user: str = "postgres") -> None:
        self.host, self.port, self.user = host, port, user
        self.name = f"celery_test_{uuid.uuid4().hex[:10]}"

    def url(self, driver: str | None = "psycopg2") -> str:
        """Celery's ``result_backend``: ``db+postgresql+<driver>://postgres@host:port/<name>``;
        ``driver`` "psycopg2" or "psycopg" (3); None for SQLAlchemy's default driver
        (psycopg 3 on SQLAlchemy 2.1, psycopg2 on 2.0)."""
        scheme = "db+postgresql" if driver is None else f"db+postgresql+{driver}"
        return f"{scheme}://{self.user}@{self.host}:{self.port}/{self.name}"

    def create(self) -> PostgresDatabase:
        self._admin(f'CREATE DATABASE "{self.name}"')
        return self

    def drop(self) -> None:
        self._admin(f'ALTER DATABASE "{self.name}" ALLOW_CONNECTIONS false', missing_ok=True)
        self.terminate_sessions()
        self._admin(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')

    def terminate_sessions(self) -> int:
        """Close every session on the database (clients see a dropped connection); how many."""
        rows = self._admin("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                           "WHERE datname = %s AND pid <> pg_backend_pid()", (self.name,))
        return len(rows)

    def sessions(self) -> int:
        """How many sessions are connected to the database now."""
        rows = self._admin("SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (self.name,))
        return int(rows[0][0])

    def make_unreachable(self) -> None:
        self._admin(f'ALTER DATABASE "{self.name}" ALLOW_CONNECTIONS false')
        self.terminate_sessions()

    def make_reachable(self) -> None:
        self._admin(f'ALTER DATABASE "{self.name}" ALLOW_CONNECTIONS true')

    def refuse_writes(self) -> None:
        self._admin(f'ALTER DATABASE "{self.name}" SET default_transaction_read_only = on')
        self.terminate_sessions()

    def allow_writes(self) -> None:
        """Writable again for new sessions; the read-only ones are terminated too (a pooled
        read-only session would otherwise keep refusing writes)."""
        self._admin(f'ALTER DATABASE "{self.name}" RESET default_transaction_read_only')
        self.terminate_sessions()

    def states(self, table: str = "celery_taskmeta") -> dict[str, str]:
        """``{task_id: status}`` of every row in Celery's result table ({} before it exists)."""
        exists = self._query(self.name, "SELECT to_regclass(%s) IS NOT NULL", (table,))[0][0]
        if not exists:
            return {}
        return {task_id: status for task_id, status in
                self._query(self.name, f'SELECT task_id, status FROM "{table}"')}

    def _admin(self, sql: str, params: tuple[Any, ...] = (), missing_ok: bool = False) -> list[Any]:
        try:
            return self._query("postgres", sql, params)
        except Exception as exc:
            if missing_ok and "does not exist" in str(exc):
                return []
            raise

    def _query(self, dbname: str, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        import psycopg  # the dev extra's; imported here so that this module needs it only here

        with psycopg.connect(host=self.host, port=self.port, user=self.user, dbname=dbname,
                             autocommit=True, connect_timeout=10) as conn:
            cur = conn.execute(sql, params or None)
            return cur.fetchall() if cur.description is not None else []


def _ctl(*args: str) -> str:
    return subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, text=True,
                          timeout=60).stdout
