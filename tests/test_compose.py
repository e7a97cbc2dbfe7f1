"""The production stack: docker-compose.yml (+ docker-compose.gpu.yml), the image, the API.

No Docker engine runs here, so:

* the compose files are validated by ``docker-compose config`` (Debian's docker-compose:
  skipped, saying so, where it isn't installed; a failure in CI, which must validate) and their
  settings are checked as Compose resolves them (tests/compose/stack.py), with and without the
  secrets; the lock files, the Dockerfile, .dockerignore and the package's wheel are checked;
* the "compose smoke" tests run each service's own command natively, with the environment the
  compose file gives its container, against servers of their own: a redis-server started from
  the compose ``command`` (password, AOF) on a free port, and a RabbitMQ user and vhost named by
  the env file. They check what a user deploying the stack relies on: the API answers ``/add``
  and ``/embed``; Flower refuses requests without its credentials; with no worker, requests
  answer 202 and their items run later; with no broker, 503 and the item never runs; queued
  items survive a crash of Redis;
* ``test_compose_stack_in_docker`` runs the real thing (build, ``up``, requests, ``down -v``)
  where a Docker engine answers, and is skipped with the reason where none does.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import tomllib
import uuid
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import yaml
from packaging.requirements import Requirement

from .compose.stack import (COMPOSE_FILE, GPU_FILE, ROOT, InterpolationError, Proc, RabbitAccount,
                            Stack, duration, free_port, load, read_env_file)
from .workers import wait_for


def _load_script(name: str) -> Any:
    """A module of scripts/ (not a package), loaded by path."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


compose_entrypoint = _load_script("compose_entrypoint")

DOCKER_COMPOSE = shutil.which("docker-compose")
HOSTNAME = socket.gethostname()
#: Seconds the API waits for a result before answering 202, in the smoke test's env file.
API_WAIT = 2


def secrets_env(**overrides: str) -> dict[str, str]:
    """An env file's values: fresh secrets, with characters that must be URL-encoded."""
    tag = uuid.uuid4().hex[:8]
    return {"REDIS_PASSWORD": secrets.token_hex(12) + "/+@=",
            "RABBITMQ_USER": f"smoke-{tag}", "RABBITMQ_PASSWORD": secrets.token_hex(12) + "/+@=",
            "RABBITMQ_VHOST": f"smoke-{tag}", "FLOWER_BASIC_AUTH": f"admin:{secrets.token_hex(12)}",
            **overrides}


def write_env(path: Path, env: dict[str, str]) -> Path:
    path.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    return path


def docker_compose(env_file: Path, *files: Path) -> subprocess.CompletedProcess[str]:
    """``docker-compose --env-file ENV -f ... config``, in a clean environment (variables of this
    process would override the env file) and from a folder without a .env of its own."""
    assert DOCKER_COMPOSE
    cmd = [DOCKER_COMPOSE, "--env-file", str(env_file), "--project-directory", str(ROOT),
           *(a for f in files for a in ("-f", str(f))), "config"]
    return subprocess.run(cmd, cwd=env_file.parent, env={"PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=120)


# --- the compose files ------------------------------------------------------------------------

def require_docker_compose() -> None:
    """Skip where docker-compose isn't installed -- but not in CI, which must validate."""
    if DOCKER_COMPOSE is None:
        message = "docker-compose is not installed (apt-get install -y docker-compose)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}: .ci/run must install it, CI validates the compose files")
        pytest.skip(message)


@pytest.mark.parametrize("files", [(COMPOSE_FILE,), (COMPOSE_FILE, GPU_FILE)], ids=["cpu", "gpu"])
def test_docker_compose_config_validates_and_reads_as_the_smoke_test_does(
        tmp_path: Path, files: tuple[Path, ...]) -> None:
    require_docker_compose()
    env_file = write_env(tmp_path / "stack.env", secrets_env())
    out = docker_compose(env_file, *files)
    assert out.returncode == 0, out.stderr
    resolved = yaml.safe_load(out.stdout.replace("$$", "$"))["services"]
    native = load(read_env_file(env_file), *files)
    assert sorted(resolved) == sorted(native) == ["flower", "rabbitmq", "redis", "web", "worker"]
    for name, spec in native.items():
        for key in ("environment", "command", "image", "user", "hostname", "deploy"):
            assert resolved[name].get(key) == spec.get(key), f"{name}.{key}"
        assert resolved[name]["healthcheck"]["test"] == spec["healthcheck"]["test"], name
        assert resolved[name].get("build", {}).get("args") == spec.get("build", {}).get("args"), name


def test_compose_refuses_to_start_without_each_secret(tmp_path: Path) -> None:
    full = secrets_env()
    required = ["REDIS_PASSWORD", "RABBITMQ_USER", "RABBITMQ_PASSWORD", "FLOWER_BASIC_AUTH"]
    load(full, COMPOSE_FILE)  # complete: loads
    for name in required:
        env = {k: v for k, v in full.items() if k != name}
        with pytest.raises(InterpolationError, match=name):
            load({**env, name: ""}, COMPOSE_FILE)
        if DOCKER_COMPOSE:
            out = docker_compose(write_env(tmp_path / f"no-{name}.env", env), COMPOSE_FILE)
            assert out.returncode != 0 and f"set {name} in .env" in out.stderr, out.stderr
    # .env.example as shipped is refused too: it holds no usable secret.
    with pytest.raises(InterpolationError):
        load(read_env_file(ROOT / ".env.example"), COMPOSE_FILE)


def test_compose_settings_for_a_safe_durable_deployment() -> None:
    services = load(secrets_env(), COMPOSE_FILE)
    for name, spec in services.items():
        assert spec["restart"] == "unless-stopped", name
        assert spec["healthcheck"]["test"], name
        for port in spec.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond this host"
    assert "ports" not in services["redis"]
    assert services["rabbitmq"]["ports"] == ["127.0.0.1:15672:15672"]  # management UI only, not AMQP

    exposed = load(secrets_env(API_PUBLISH_ADDRESS="0.0.0.0"), COMPOSE_FILE)
    assert exposed["web"]["ports"] == ["0.0.0.0:8000:8000"]
    assert exposed["flower"]["ports"] == ["127.0.0.1:5555:5555"]  # admin UIs have their own switch

    redis_cmd = services["redis"]["command"][-1]
    for arg in ("--appendonly yes", "--appendfsync everysec", "requirepass $REDIS_PASSWORD"):
        assert arg in redis_cmd
    assert "redis-data:/data" in services["redis"]["volumes"]
    rabbit = services["rabbitmq"]
    assert rabbit["hostname"] == "rabbitmq" and "rabbitmq-data:/var/lib/rabbitmq" in rabbit["volumes"]
    assert rabbit["environment"]["RABBITMQ_DEFAULT_USER"] not in ("", "guest")

    worker = services["worker"]
    limit = next(int(a.split("=")[1]) for a in worker["command"] if a.startswith("--time-limit="))
    assert duration(worker["stop_grace_period"]) >= limit + 30, "a batch could outlive the grace period"
    assert worker["command"][worker["command"].index("-n") + 1] == "worker@%h"
    assert '--destination "worker@$HOSTNAME"' in worker["healthcheck"]["test"][1]
    assert "FLOWER_UNAUTHENTICATED_API" not in services["flower"]["environment"]
    assert services["flower"]["environment"]["FLOWER_BASIC_AUTH"]

    gpu = load(secrets_env(), COMPOSE_FILE, GPU_FILE)
    device = gpu["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and device["count"] == 1 and device["capabilities"] == ["gpu"]
    assert gpu["worker"]["build"]["args"]["TORCH_VARIANT"] == "cuda"
    assert gpu["worker"]["image"] != gpu["web"]["image"] == services["web"]["image"]
    assert gpu["worker"]["environment"]["EXAMPLE_EMBED_BATCH_SIZE"] == "128"


def test_entrypoint_builds_urls_with_encoded_secrets() -> None:
    env = {"REDIS_PASSWORD": "p/w+@=", "RABBITMQ_USER": "u@x", "RABBITMQ_PASSWORD": "s/e",
           "REDIS_ADDRESS": "127.0.0.1:7000"}
    urls = compose_entrypoint.celery_urls(env)
    assert urls == {"CELERY_BROKER_URL": "redis://:p%2Fw%2B%40%3D@127.0.0.1:7000/0",
                    "CELERY_RESULT_BACKEND": "redis://:p%2Fw%2B%40%3D@127.0.0.1:7000/1"}
    rabbit = compose_entrypoint.celery_urls({**env, "BROKER": "rabbitmq", "RABBITMQ_VHOST": "a/b"})
    assert rabbit["CELERY_BROKER_URL"] == "pyamqp://u%40x:s%2Fe@rabbitmq:5672/a%2Fb"
    own = compose_entrypoint.celery_urls({**env, "CELERY_BROKER_URL": "rediss://elsewhere:6380/0"})
    assert own["CELERY_BROKER_URL"] == "rediss://elsewhere:6380/0"
    with pytest.raises(compose_entrypoint.ConfigError, match="REDIS_PASSWORD"):
        compose_entrypoint.celery_urls({})
    with pytest.raises(compose_entrypoint.ConfigError, match="BROKER"):
        compose_entrypoint.celery_urls({**env, "BROKER": "sqs"})


# --- the image --------------------------------------------------------------------------------

def _locked(*names: str) -> dict[str, str]:
    pins = {}
    for name in names:
        text = (ROOT / "requirements" / name).read_text()
        for entry in re.split(r"\n(?=[A-Za-z])", text):
            m = re.match(r"([A-Za-z0-9_.-]+)==(\S+)", entry)
            if m:
                assert re.search(r"--hash=sha256:[0-9a-f]{64}", entry), f"{name}: {m.group(1)} has no hash"
                pins[m.group(1).lower()] = m.group(2)
    return pins


@pytest.mark.parametrize("variant", ["cpu", "cuda"])
def test_lock_files_pin_every_requirement_with_a_hash(variant: str) -> None:
    pins = _locked("app.txt", f"torch-{variant}.txt")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extras = project["project"]["optional-dependencies"]
    for line in [*project["project"]["dependencies"], *extras["example"], *extras["msgpack"]]:
        req = Requirement(line)
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        assert name in pins, f"{variant}: {req.name} is not locked"
        assert req.specifier.contains(pins[name], prereleases=True), f"{variant}: {name}=={pins[name]} vs {req}"
    assert pins["torch"].endswith("+cpu") == (variant == "cpu")


def test_the_package_wheel_carries_every_module(tmp_path: Path) -> None:
    """The image installs celery-batched from a wheel, not in editable mode as .venv does: a
    subpackage missing from pyproject's package list would be missing there."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "celery_batched", src / "celery_batched",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), str(src)], check=True, capture_output=True, timeout=120)
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as zf:
        shipped = {n for n in zf.namelist() if n.startswith("celery_batched/")}
    expected = {p.relative_to(src).as_posix() for p in (src / "celery_batched").rglob("*")
                if p.is_file()}
    assert sorted(expected - shipped) == [], "pyproject.toml leaves these out of the wheel"


def _pattern(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regex: ``**`` any depth, ``*``/``?`` within one name."""
    tokens = re.split(r"(\*\*/|\*\*|\*|\?)", pattern.rstrip("/"))
    return re.compile("".join({"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(t, re.escape(t))
                              for t in tokens))


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    excluded = False
    for pattern in patterns:
        if any(_pattern(pattern.lstrip("!")).fullmatch(c) for c in candidates):
            excluded = not pattern.startswith("!")
    return excluded


def test_dockerfile_and_dockerignore() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM \S+ AS (\w+)", dockerfile, re.M)
    assert len(stages) >= 2, "multi-stage: the runtime image carries no build tooling"
    runtime = dockerfile.split(f"AS {stages[-1]}", 1)[1]
    user = re.findall(r"^USER (\S+)", runtime, re.M)
    assert user and user[-1] not in ("root", "0"), "the runtime stage must run as a non-root user"
    assert "ARG TORCH_VARIANT" in dockerfile and "requirements/torch-${TORCH_VARIANT}.txt" in dockerfile
    assert dockerfile.count("--require-hashes") == 2

    patterns = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    for path in (".venv/bin/python", ".env", ".git/HEAD", "benchmarks/.venvs/x/bin/python",
                 ".gpu_bundle/redis.tar.xz", "example_project/__pycache__/web.cpython-311.pyc"):
        assert _dockerignored(path, patterns), f"{path} would be sent to the Docker daemon"
    sources = [src for line in re.findall(r"^COPY (?!--from)(.+)$", dockerfile, re.M)
               for src in line.split()[:-1]]
    for src in sources:
        src = src.replace("${TORCH_VARIANT}", "cpu")
        assert (ROOT / src).exists(), src
        assert not _dockerignored(src + ("/__init__.py" if (ROOT / src).is_dir() else ""), patterns), src


# --- compose smoke: the services' commands, run natively --------------------------------------

@pytest.fixture
def compose(tmp_path: Path) -> Iterator[Callable[..., tuple[Stack, dict[str, str]]]]:
    """``compose(**env overrides)`` -> (a Stack of the compose file, the env file's values).

    Whatever it started is killed at the end, whatever happened; a RabbitMQ user and vhost it
    created are deleted."""
    stacks: list[Stack] = []
    accounts: list[RabbitAccount] = []

    def make(**overrides: str) -> tuple[Stack, dict[str, str]]:
        env = secrets_env(API_RESULT_TIMEOUT=str(API_WAIT), **overrides)
        write_env(tmp_path / "stack.env", env)  # what `docker compose --env-file` would read
        services = load(read_env_file(tmp_path / "stack.env"), COMPOSE_FILE)
        if env.get("BROKER") == "rabbitmq":
            accounts.append(RabbitAccount(env["RABBITMQ_USER"], env["RABBITMQ_PASSWORD"],
                                          env["RABBITMQ_VHOST"]).create())
        stack = Stack(services, tmp_path, {
            "redis": f"127.0.0.1:{free_port()}", "rabbitmq": "127.0.0.1:5672",
            "listen": "127.0.0.1", "web_port": str(free_port()), "flower_port": str(free_port()),
            "metrics_port": str(free_port())})
        stacks.append(stack)
        return stack, env

    yield make
    for stack in stacks:
        stack.close()
    for account in accounts:
        account.delete()


def redis_up(stack: Stack, env: dict[str, str], db: int = 0) -> redis.Redis:
    host, port = stack.addresses["redis"].split(":")
    client = redis.Redis(host=host, port=int(port), db=db, password=env["REDIS_PASSWORD"])

    def pong() -> bool:
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False

    wait_for(pong, 15, 0.05, "the compose redis to answer")
    return client


def wait_healthy(stack: Stack, name: str, timeout: float) -> None:
    """Run the service's healthcheck until it passes, as Docker's would before 'healthy'."""
    last: list[Any] = []

    proc = [p for p in stack.procs if p.name == name][-1]

    def healthy() -> bool:
        assert proc.running(), f"{name} exited:\n{proc.log()[-3000:]}"
        last[:] = [stack.healthcheck(name)]
        return last[0].returncode == 0

    try:
        wait_for(healthy, timeout, 0.5, f"{name}'s healthcheck")
    except AssertionError:
        raise AssertionError(f"{name} not healthy: {last[0] if last else None}\n"
                             f"{proc.log()[-3000:]}") from None


def worker_ready(worker: Proc) -> None:
    """Until the worker logs "ready" (before that its healthcheck waits its whole --timeout)."""
    wait_for(lambda: " ready." in worker.log() or not worker.running(), 90, 0.2, "the worker")
    assert worker.running(), worker.log()[-3000:]


def poll_results(api: httpx.Client, ids: list[str], timeout: float) -> dict[str, dict[str, Any]]:
    done: dict[str, dict[str, Any]] = {}

    def all_done() -> bool:
        for task_id in ids:
            if task_id not in done:
                body = api.get(f"/tasks/{task_id}").json()
                if body["status"] not in ("PENDING", "STARTED", "RETRY", "RECEIVED"):
                    done[task_id] = body
        return len(done) == len(ids)

    wait_for(all_done, timeout, 0.5, f"{len(ids)} queued items to finish")
    return done


def test_compose_smoke_redis(compose: Callable[..., tuple[Stack, dict[str, str]]]) -> None:
    stack, env = compose()
    started = time.monotonic()
    redis_proc = stack.start("redis")
    wait_healthy(stack, "redis", 15)
    broker = redis_up(stack, env)
    assert broker.config_get("appendonly") == {"appendonly": "yes"}
    assert broker.config_get("appendfsync") == {"appendfsync": "everysec"}
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=broker.connection_pool.connection_kwargs["port"]).ping()

    worker = stack.start("worker")
    stack.start("web")
    stack.start("flower")
    worker_ready(worker)
    for name in ("worker", "web", "flower"):
        wait_healthy(stack, name, 90)
    assert f"worker@{HOSTNAME}: OK" in stack.healthcheck("worker").stdout  # pinged itself by name

    api = httpx.Client(base_url=f"http://127.0.0.1:{stack.addresses['web_port']}", timeout=30)
    health = api.get("/healthz")
    assert health.status_code == 200 and health.json()["workers"] == [f"worker@{HOSTNAME}"], health.text
    with ThreadPoolExecutor(32) as pool:
        adds = list(pool.map(lambda xy: api.post("/add", json={"x": xy[0], "y": xy[1]}),
                             [(1, 300), (2, 200), (3, 100)]))
    assert [r.status_code for r in adds] == [200, 200, 200], [r.text for r in adds]
    assert [r.json()["result"] for r in adds] == [301, 202, 103]
    # The worker serves batching's metrics where the compose file says, and logs where.
    port = stack.addresses["metrics_port"]
    assert f"celery_batched: Prometheus metrics at http://127.0.0.1:{port}/metrics" in worker.log()
    succeeded = 'celery_batched_items_total{outcome="succeeded",task="example_project.batch_add"} 3.0'
    wait_for(lambda: succeeded in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text,
             10, 0.1, "the three /add items in the worker's metrics")
    # The first batch loads the model, which may take longer than API_WAIT: then the answer is
    # 202 and the vector comes from /tasks/{id}. The model stays loaded: the next one is 200.
    text = "The quick brown fox jumps over the lazy dog."
    first = api.post("/embed", json={"text": text})
    assert first.status_code in (200, 202), first.text
    vectors = [first.json()["embedding"] if first.status_code == 200 else
               poll_results(api, [first.json()["task_id"]], 60)[first.json()["task_id"]]["result"]]
    embedded = api.post("/embed", json={"text": text})
    assert embedded.status_code == 200, embedded.text
    vectors.append(embedded.json()["embedding"])
    for vector in vectors:
        assert len(vector) == 384 and math.isclose(math.hypot(*vector), 1.0, rel_tol=1e-3)
    assert math.isclose(sum(a * b for a, b in zip(*vectors)), 1.0, rel_tol=1e-3)  # the same text

    # Flower: nothing but /healthcheck without the credentials, everything with them.
    user, password = env["FLOWER_BASIC_AUTH"].split(":", 1)
    flower = httpx.Client(base_url=f"http://127.0.0.1:{stack.addresses['flower_port']}", timeout=30)
    assert flower.get("/healthcheck").text == "OK"
    for path in ("/", "/api/workers", "/metrics"):
        assert flower.get(path).status_code == 401, path
        assert flower.get(path, auth=(user, "wrong")).status_code == 401, path
    workers = flower.get("/api/workers", params={"refresh": "true"}, auth=(user, password))
    assert workers.status_code == 200 and f"worker@{HOSTNAME}" in workers.json(), workers.text
    metrics = flower.get("/metrics", auth=(user, password))
    assert metrics.status_code == 200 and "flower_events_total" in metrics.text
    assert flower.get("/", auth=(user, password)).status_code == 200

    # `docker compose stop worker`: a warm shutdown within the grace period.
    grace = duration(stack.services["worker"]["stop_grace_period"])
    assert worker.stop(grace)[0] == 0, worker.log()[-3000:]
    unhealthy = api.get("/healthz")
    assert unhealthy.status_code == 503 and unhealthy.json()["workers"] == [], unhealthy.text

    # No worker: each request answers 202 after API_WAIT seconds; its item stays queued.
    items = [(i, 1000) for i in range(21)]
    with ThreadPoolExecutor(32) as pool:
        accepted = list(pool.map(lambda xy: api.post("/add", json={"x": xy[0], "y": xy[1]}), items))
    assert [r.status_code for r in accepted] == [202] * len(items), [r.text for r in accepted]
    ids = [r.json()["task_id"] for r in accepted]
    assert [r.headers["location"] for r in accepted] == [f"/tasks/{i}" for i in ids]
    assert api.get(f"/tasks/{ids[0]}").json()["status"] == "PENDING"
    assert broker.llen("gpu") == len(items)

    # Redis crashes (SIGKILL). Meanwhile the API says so: 503, and the item is not queued (the
    # count after the restart proves it); then Redis comes back from its AOF with every item.
    redis_proc.kill()
    down = api.post("/add", json={"x": 0, "y": 0})
    assert down.status_code == 503, down.text
    assert api.get("/healthz").status_code == 503
    stack.start("redis")
    broker = redis_up(stack, env)
    assert broker.llen("gpu") == len(items), "queued items were lost across the Redis restart"

    worker_ready(stack.start("worker"))
    wait_healthy(stack, "worker", 90)
    results = poll_results(api, ids, 60)
    assert [results[i]["status"] for i in ids] == ["SUCCESS"] * len(items), results
    assert [results[i]["result"] for i in ids] == [x + y for x, y in items]
    # The API and the worker reconnected by themselves.
    again = api.post("/add", json={"x": 5, "y": 6})
    assert again.status_code == 200 and again.json() == {"result": 11}, again.text
    assert api.get("/healthz").status_code == 200
    assert time.monotonic() - started < 120


@pytest.mark.rabbitmq
def test_compose_smoke_rabbitmq(compose: Callable[..., tuple[Stack, dict[str, str]]]) -> None:
    """BROKER=rabbitmq: the worker and the API use the env file's user and vhost (guest has no
    permission there), results stay in the compose Redis."""
    stack, env = compose(BROKER="rabbitmq")
    stack.start("redis")
    results_db = redis_up(stack, env, db=1)
    worker_ready(stack.start("worker"))
    stack.start("web")
    for name in ("worker", "web"):
        wait_healthy(stack, name, 90)
    api = httpx.Client(base_url=f"http://127.0.0.1:{stack.addresses['web_port']}", timeout=30)
    with ThreadPoolExecutor(8) as pool:
        adds = list(pool.map(lambda xy: api.post("/add", json={"x": xy[0], "y": xy[1]}),
                             [(1, 300), (2, 200), (3, 100)]))
    assert [r.status_code for r in adds] == [200, 200, 200], [r.text for r in adds]
    assert [r.json()["result"] for r in adds] == [301, 202, 103]
    account = RabbitAccount(env["RABBITMQ_USER"], env["RABBITMQ_PASSWORD"], env["RABBITMQ_VHOST"])
    assert "gpu" in account.queues()
    assert results_db.dbsize() >= 3  # the three results
    assert not redis_up(stack, env, db=0).exists("gpu")  # nothing queued through Redis


# --- with a Docker engine ---------------------------------------------------------------------

def _docker_engine() -> str | None:
    """Why the Docker test can't run here, or None when an engine answers."""
    if shutil.which("docker") is None:
        return "no docker CLI"
    info = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"],
                          capture_output=True, text=True, timeout=20)
    if info.returncode:
        return f"no Docker engine answers (`docker info`: {info.stderr.strip().splitlines()[-1:]})"
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode and not DOCKER_COMPOSE:
        return "neither `docker compose` nor docker-compose is installed"
    return None


@pytest.mark.docker
@pytest.mark.timeout(1800)
def test_compose_stack_in_docker(tmp_path: Path) -> None:
    """Build the image, ``up --wait``, use the API and Flower, ``down -v``: the stack itself."""
    reason = _docker_engine()
    if reason:
        pytest.skip(reason)
    cli = (["docker", "compose"] if subprocess.run(["docker", "compose", "version"],
                                                   capture_output=True).returncode == 0
           else [str(DOCKER_COMPOSE)])
    env = secrets_env(API_PORT=str(free_port()), FLOWER_PUBLISH_PORT=str(free_port()),
                      RABBITMQ_MANAGEMENT_PORT=str(free_port()))
    env_file = write_env(tmp_path / "stack.env", env)
    project = ["--env-file", str(env_file), "-p", f"cbsmoke{uuid.uuid4().hex[:8]}", "-f", str(COMPOSE_FILE)]
    try:
        subprocess.run([*cli, *project, "up", "-d", "--build"], check=True, timeout=1500)
        api = httpx.Client(base_url=f"http://127.0.0.1:{env['API_PORT']}", timeout=30)

        def healthy() -> bool:
            try:
                return api.get("/healthz").status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(healthy, 300, 2, "the stack's /healthz")
        assert api.post("/add", json={"x": 1, "y": 300}).json() == {"result": 301}
        assert len(api.post("/embed", json={"text": "a sentence"}).json()["embedding"]) == 384
        flower = httpx.Client(base_url=f"http://127.0.0.1:{env['FLOWER_PUBLISH_PORT']}", timeout=30)
        user, password = env["FLOWER_BASIC_AUTH"].split(":", 1)
        assert flower.get("/api/workers").status_code == 401
        assert flower.get("/api/workers", auth=(user, password)).status_code == 200
    finally:
        subprocess.run([*cli, *project, "down", "-v", "--remove-orphans"], timeout=300)
