"""Celery apps used by ``benchmarks/run.py``; each is started as its own ``celery worker``."""
