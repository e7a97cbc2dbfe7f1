"""docker-compose.yml, read as Compose reads it and run natively, as Docker would run it.

No Docker engine runs on the test machines, so the compose smoke test starts each service's
command as a process here, with the environment Compose would give its container:

* :func:`load` reads the compose file(s) the way ``docker compose config`` does -- YAML merge
  keys, ``${VAR}`` / ``${VAR:-default}`` / ``${VAR:?error}`` / ``$$`` interpolation from an env
  file, override files merged over the base -- so what runs is what the file says (and
  tests/test_compose.py checks the result against ``docker-compose config`` where it is installed);
* :func:`image_env` and :func:`image_entrypoint` are the Dockerfile's runtime ``ENV`` and
  ``ENTRYPOINT``;
* :class:`Stack` runs a service: ``entrypoint + command`` with image env + service env, where
  only what Docker's network provides is replaced (:data:`CONTAINER_NETWORK`): service names
  become 127.0.0.1 and the servers of this test, listening on 0.0.0.0:<fixed port> becomes
  127.0.0.1:<free port>, ``HOSTNAME`` is this host's name (Docker sets it to the container's).
  Redis runs from the compose ``command`` too, with its data directory and port moved (and its
  healthcheck's ``redis-cli`` pointed at that port).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..workers import kill_group

ROOT = Path(__file__).resolve().parent.parent.parent
VENV_BIN = Path(sys.executable).parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
GPU_FILE = ROOT / "docker-compose.gpu.yml"

#: What a container gets from Docker's network, by variable: the value the compose file must
#: set (checked, so a changed compose file fails the test instead of being half-translated), and
#: the key of the native value in ``Stack.addresses``.
CONTAINER_NETWORK = {
    "REDIS_ADDRESS": ("redis:6379", "redis"),
    "RABBITMQ_ADDRESS": ("rabbitmq:5672", "rabbitmq"),
    "UVICORN_HOST": ("0.0.0.0", "listen"),
    "UVICORN_PORT": ("8000", "web_port"),
    "FLOWER_ADDRESS": ("0.0.0.0", "listen"),
    "FLOWER_PORT": ("5555", "flower_port"),
    "CELERY_BATCHED_METRICS_ADDR": ("0.0.0.0", "listen"),
    "CELERY_BATCHED_METRICS_PORT": ("9808", "metrics_port"),
}
#: The Redis service's data directory in its container (a volume); replaced by a directory of
#: the test's own, and a port and a loopback bind added.
REDIS_DATA_ARG = "--dir /data"

_VAR = re.compile(r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")


class InterpolationError(ValueError):
    """A ``${VAR:?message}`` whose variable is unset (or empty): Compose refuses to start."""


def read_env_file(path: Path) -> dict[str, str]:
    """``KEY=VALUE`` lines; blank lines and ``#`` comments skipped (Compose's .env format)."""
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    return env


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose's variable substitution on every string inside ``value``."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        if m.group(1):
            return "$"
        name = m.group(2) or m.group(5)
        op, arg = m.group(3), m.group(4) or ""
        current = env.get(name)
        missing = current is None or (current == "" and op is not None and op.startswith(":"))
        if op in (":-", "-") and missing:
            return arg
        if op in (":?", "?") and missing:
            raise InterpolationError(f"{name}: {arg}")
        return current or ""

    return _VAR.sub(sub, value)


def _merge(base: Any, override: Any) -> Any:
    """An override file over the base: mappings merged key by key, anything else replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = _merge(base[key], value) if key in base else value
        return merged
    return override


def load(env: Mapping[str, str], *files: Path) -> dict[str, Any]:
    """The services of ``files`` (base first), as ``docker compose config`` resolves them."""
    merged: dict[str, Any] = {}
    for path in files or (COMPOSE_FILE,):
        merged = _merge(merged, interpolate(yaml.safe_load(path.read_text()), env))
    services = merged["services"]
    for spec in services.values():
        if isinstance(spec.get("environment"), dict):
            spec["environment"] = {k: "" if v is None else str(v) for k, v in spec["environment"].items()}
    return services


def _dockerfile_stage(dockerfile: Path) -> list[str]:
    """The last stage's instructions, continuation lines joined."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    last = max(i for i, ln in enumerate(lines) if ln.upper().startswith("FROM "))
    return lines[last:]


def image_entrypoint(dockerfile: Path = ROOT / "Dockerfile") -> list[str]:
    """The runtime stage's ``ENTRYPOINT`` (exec form)."""
    found = [ln for ln in _dockerfile_stage(dockerfile) if ln.upper().startswith("ENTRYPOINT ")]
    assert len(found) == 1, f"{dockerfile}: expected one ENTRYPOINT in the last stage, got {found}"
    return list(json.loads(found[0].split(None, 1)[1]))


def image_env(dockerfile: Path = ROOT / "Dockerfile") -> dict[str, str]:
    """The runtime stage's ``ENV`` (``ARG`` defaults substituted), PATH left out: here the
    project's venv stands in for the image's."""
    stage = _dockerfile_stage(dockerfile)
    args = {}
    env: dict[str, str] = {}
    for line in stage:
        word, _, rest = line.partition(" ")
        if word.upper() == "ARG" and "=" in rest:
            key, _, value = rest.partition("=")
            args[key.strip()] = value.strip()
        elif word.upper() == "ENV":
            for pair in shlex.split(rest):
                key, _, value = pair.partition("=")
                env[key] = interpolate(value, {**args, **env})
    env.pop("PATH", None)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Proc:
    """One service's process (its own process group), its log under the test's tmp_path."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, cwd=ROOT, env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float) -> tuple[int | None, float]:
        """SIGTERM, as ``docker stop`` sends: ``(exit status or None if still running after
        timeout, seconds taken)``; a process still running then is killed."""
        assert self.proc is not None
        started = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                return None, time.monotonic() - started
        return self.proc.returncode, time.monotonic() - started

    def kill(self) -> None:
        """SIGKILL to the whole process group (a worker's pool children too)."""
        kill_group(self.proc)


@dataclass
class Stack:
    """The compose services of ``services`` run natively; ``close()`` kills what is left."""

    services: dict[str, Any]
    workdir: Path
    addresses: dict[str, str]
    procs: list[Proc] = field(default_factory=list)

    def env_for(self, name: str) -> dict[str, str]:
        """Image env + the service's compose env, with the container network translated."""
        service_env = dict(self.services[name].get("environment") or {})
        for var, (container_value, key) in CONTAINER_NETWORK.items():
            if var in service_env:
                assert service_env[var] == container_value, (
                    f"{name}: {var}={service_env[var]!r}, the smoke test maps {container_value!r}")
                service_env[var] = self.addresses[key]
        base = {"PATH": f"{VENV_BIN}{os.pathsep}/usr/local/bin:/usr/bin:/bin",
                "HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8",
                "HOSTNAME": socket.gethostname()}
        image = image_env() if "build" in self.services[name] else {}
        return {**base, **image, **service_env}

    def argv_for(self, name: str) -> list[str]:
        spec = self.services[name]
        command = list(spec["command"])
        if name == "redis":
            script = command[-1]
            assert script.count(REDIS_DATA_ARG) == 1, f"redis command without {REDIS_DATA_ARG!r}: {script}"
            data = self.workdir / "redis-data"
            data.mkdir(exist_ok=True)
            host, port = self.addresses["redis"].split(":")
            command[-1] = script.replace(REDIS_DATA_ARG, f"--dir {data} --port {port} --bind {host}")
            return command
        return [*image_entrypoint(), *command] if "build" in spec else command

    def start(self, name: str) -> Proc:
        proc = Proc(name, self.argv_for(name), self.env_for(name),
                    self.workdir / f"compose-{name}-{len(self.procs)}.log")
        self.procs.append(proc.start())
        return proc

    def healthcheck(self, name: str) -> subprocess.CompletedProcess[str]:
        """Run the service's healthcheck as Docker would (``CMD`` or ``CMD-SHELL``)."""
        test = list(self.services[name]["healthcheck"]["test"])
        assert test[0] in ("CMD", "CMD-SHELL"), test
        if name == "redis":  # in its container, redis-cli's default 127.0.0.1:6379 is this Redis
            assert test[-1].count("redis-cli ") == 1, test
            host, port = self.addresses["redis"].split(":")
            test[-1] = test[-1].replace("redis-cli ", f"redis-cli -h {host} -p {port} ")
        argv = test[1:] if test[0] == "CMD" else ["sh", "-c", test[1]]
        return subprocess.run(argv, cwd=ROOT, env=self.env_for(name), capture_output=True,
                              text=True, timeout=duration(self.services[name]["healthcheck"]["timeout"]))

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.kill()


class RabbitAccount:
    """A RabbitMQ user and vhost of the test's own on the shared server, named by the env file
    (as the rabbitmq service would create them from RABBITMQ_DEFAULT_*); deleted afterwards."""

    def __init__(self, user: str, password: str, vhost: str) -> None:
        self.user, self.password, self.vhost = user, password, vhost

    def create(self) -> RabbitAccount:
        rabbitmqctl("add_user", self.user, self.password)
        rabbitmqctl("add_vhost", self.vhost)
        rabbitmqctl("set_permissions", "-p", self.vhost, self.user, ".*", ".*", ".*")
        return self

    def delete(self) -> None:
        rabbitmqctl("delete_vhost", self.vhost, check=False)
        rabbitmqctl("delete_user", self.user, check=False)

    def queues(self) -> dict[str, int]:
        out = rabbitmqctl("-q", "list_queues", "-p", self.vhost, "name", "messages")
        return {name: int(n) for name, n in (ln.split() for ln in out.splitlines() if len(ln.split()) == 2)
                if n.isdigit()}


def rabbitmqctl(*args: str, check: bool = True) -> str:
    return subprocess.run(["rabbitmqctl", *args], check=check, capture_output=True, text=True,
                          timeout=60).stdout


def duration(value: str | int | float) -> float:
    """Compose durations: ``90s``, ``1m30s``, ``2m``, ``500ms``, or plain seconds."""
    if isinstance(value, (int, float)):
        return float(value)
    total = 0.0
    for number, unit in re.findall(r"([\d.]+)(ms|h|m|s)", value):
        total += float(number) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    return total
