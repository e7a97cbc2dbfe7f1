"""The version matrix: the suite on each Celery/kombu minor release this package claims.

``make test`` runs everything on the newest release (the project's .venv); ``make test-matrix``
(this file) runs the engine, behaviour, policies, monitoring, fault-injection and internals
tests on the other ones, each with the redis-py its own ``[redis]`` extra allows. ``tests/test_internals.py`` pins the
Celery/kombu functions we mirror to exactly these releases.
"""

from __future__ import annotations

import nox

#: (celery, kombu) besides the newest, which `make test` covers. Celery 5.5 isn't claimed: it
#: closes the broker connection before a warm shutdown's last acks (the running batch runs twice).
MATRIX = [("5.6.3", "5.6.2")]
#: A Redis db of the matrix's own: the main suite's is 11, the benchmarks' 13.
REDIS = "redis://127.0.0.1:6379/4"

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = True


@nox.session(python="3.11")
@nox.parametrize("celery,kombu", MATRIX, ids=[f"celery-{c}" for c, _ in MATRIX])
def matrix(session: nox.Session, celery: str, kombu: str) -> None:
    session.install(f"celery[redis,msgpack]=={celery}", f"kombu=={kombu}", "hiredis", "numpy",
                    "prometheus-client",
                    "pytest>=8", "pytest-timeout>=2.3", "psutil>=5.9")
    session.install("--no-deps", "-e", ".")
    env = {"TEST_REDIS_URL": REDIS, "TEST_BROKER_URL": REDIS, "TEST_BACKEND_URL": REDIS}
    session.run("python", "-m", "pytest", "tests/test_core.py", "tests/test_behaviour.py",
                "tests/test_policies.py", "tests/test_monitoring.py",
                "tests/test_internals.py", "tests/test_reliability.py", *session.posargs, env=env)
