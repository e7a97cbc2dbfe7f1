#!/usr/bin/env python3
"""The image's entrypoint: derive Celery's URLs from the stack's secrets, then exec the command.

    python scripts/compose_entrypoint.py celery -A example_project worker ...

Why a script and not URLs in docker-compose.yml: a password inside a URL must be URL-encoded (a
generated one with ``/``, ``+`` or ``@`` would otherwise break the URL or, worse, point it
elsewhere), and Compose's interpolation can neither encode nor choose between two URLs.

Environment (docker-compose.yml sets it from .env):

* ``BROKER`` -- ``redis`` (default) or ``rabbitmq``.
* ``REDIS_PASSWORD``, ``REDIS_ADDRESS`` (``host:port``, default ``redis:6379``): the broker's
  database 0 when ``BROKER=redis``, and database 1 for the results (kept apart, so ``LLEN gpu``
  on db 0 is the queue and nothing else).
* ``RABBITMQ_USER``, ``RABBITMQ_PASSWORD``, ``RABBITMQ_VHOST`` (default ``celery``),
  ``RABBITMQ_ADDRESS`` (default ``rabbitmq:5672``): used when ``BROKER=rabbitmq``.
* ``CELERY_BROKER_URL`` / ``CELERY_RESULT_BACKEND``, when set, are kept as they are (a managed
  Redis with TLS, say); only the missing one is derived.

A missing secret stops the container at once with a message naming it, instead of letting
Celery retry a connection that can never be authenticated.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, MutableMapping
from urllib.parse import quote


class ConfigError(Exception):
    """The environment can't describe a broker or a result backend."""


def _required(env: Mapping[str, str], name: str) -> str:
    value = env.get(name, "")
    if not value:
        raise ConfigError(f"{name} is not set: copy .env.example to .env and fill it in "
                          f"(docs/production.md, Containers)")
    return value


def _redis_url(env: Mapping[str, str], db: int) -> str:
    password = quote(_required(env, "REDIS_PASSWORD"), safe="")
    return f"redis://:{password}@{env.get('REDIS_ADDRESS') or 'redis:6379'}/{db}"


def _amqp_url(env: Mapping[str, str]) -> str:
    user = quote(_required(env, "RABBITMQ_USER"), safe="")
    password = quote(_required(env, "RABBITMQ_PASSWORD"), safe="")
    vhost = quote(env.get("RABBITMQ_VHOST") or "celery", safe="")
    return f"pyamqp://{user}:{password}@{env.get('RABBITMQ_ADDRESS') or 'rabbitmq:5672'}/{vhost}"


def celery_urls(env: Mapping[str, str]) -> dict[str, str]:
    """``CELERY_BROKER_URL`` and ``CELERY_RESULT_BACKEND`` for ``env`` (explicit ones win)."""
    urls = {}
    if env.get("CELERY_BROKER_URL"):
        urls["CELERY_BROKER_URL"] = env["CELERY_BROKER_URL"]
    else:
        broker = (env.get("BROKER") or "redis").strip().lower()
        if broker == "redis":
            urls["CELERY_BROKER_URL"] = _redis_url(env, 0)
        elif broker == "rabbitmq":
            urls["CELERY_BROKER_URL"] = _amqp_url(env)
        else:
            raise ConfigError(f"BROKER={broker!r}: use redis or rabbitmq")
    urls["CELERY_RESULT_BACKEND"] = env.get("CELERY_RESULT_BACKEND") or _redis_url(env, 1)
    return urls


def main(argv: list[str], env: MutableMapping[str, str] = os.environ) -> int:
    if not argv:
        print("usage: compose_entrypoint.py COMMAND [ARG...]", file=sys.stderr)
        return 64
    try:
        env.update(celery_urls(env))
    except ConfigError as exc:
        print(f"compose_entrypoint: {exc}", file=sys.stderr)
        return 78  # EX_CONFIG
    os.execvp(argv[0], argv)  # the command becomes this process: it gets the signals directly


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
