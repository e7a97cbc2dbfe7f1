# Two commands do all set-up on a fresh machine:
#   make demo   -- install into .venv, then run the batching demo (no server needed)
#   make test   -- install into .venv, make sure Redis, RabbitMQ and PostgreSQL run, then run the tests
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build; a plain `torch` requirement would pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: demo test test-matrix install services bench lock docs dist

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m example_project.demo

services:
	bash scripts/ensure-services.sh

test: install services
	$(PY) -m pytest

# The suite on the other Celery/kombu releases this package claims (noxfile.py; CI runs it).
test-matrix: install services
	$(PY) -m nox

bench: install services
	$(PY) benchmarks/run.py

# Regenerate the container images' pinned requirements (requirements/*.txt).
lock: install
	$(PY) scripts/compose_lock.py

# The documentation site, strictly: a warning (broken link or reference, missing include) fails it.
docs: install
	$(PY) -m sphinx -W -n --keep-going -E -q -b html docs docs/_build/html

# The release files (dist/), checked as PyPI would render and accept them.
dist: install
	rm -rf dist
	$(PY) -m build --sdist --wheel --outdir dist .
	$(PY) -m twine check --strict dist/*
