"""The version matrix: the suite on each Celery/kombu minor release this package claims.

``make test`` runs everything on the newest release (the project's .venv); ``make test-matrix``
(this file) runs the engine, behaviour, policies, monitoring, fault-injection, guarantees and
internals tests, and the configuration x fault matrix's cells that go through Celery's own
request handlers, on the other ones, each with the redis-py its own ``[redis]`` extra allows. ``tests/test_internals.py`` pins the
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
                    "prometheus-client", "sqlalchemy>=2", "psycopg2-binary>=2.9",
                    "psycopg[binary]>=3.1",
                    "orjson>=3.9", "pytest>=8", "pytest-timeout>=2.3", "psutil>=5.9")
    session.install("--no-deps", "-e", ".")
    env = {"TEST_REDIS_URL": REDIS, "TEST_BROKER_URL": REDIS, "TEST_BACKEND_URL": REDIS}
    # The matrix's cells whose path runs through Celery's own Request handlers (lost children,
    # time limits, backend faults); the rest of it runs on the newest release only.
    session.run("python", "-m", "pytest", "tests/test_core.py", "tests/test_behaviour.py",
                "tests/test_policies.py", "tests/test_monitoring.py",
                "tests/test_internals.py", "tests/test_reliability.py",
                "tests/test_guarantees.py", "tests/test_quorum.py", "tests/test_shutdown.py",
                "tests/matrix", "-m", "not matrix or celery_handlers", *session.posargs, env=env)
