# One environment per dependency set, kept outside the checkout so a fresh clone on the same machine
# reuses the 5.5 GB torch install, while a fresh machine builds it from nothing.
SHELL := /bin/bash
PYTHON ?= python3
ENV_ROOT ?= $(HOME)/.cache/finetune-service/envs
# The key is a hash of the dependency lists in pyproject.toml (and the Python version), nothing else.
REQUIREMENTS := $(shell $(PYTHON) -c "import tomllib;p=tomllib.load(open('pyproject.toml','rb'))['project'];print(' '.join(repr(r) for r in p['dependencies']+p['optional-dependencies']['service']+p['optional-dependencies']['dev']))")
ENV_KEY := $(shell echo "$(REQUIREMENTS) $$($(PYTHON) -V)" | sha256sum | cut -c1-12)
ENV := $(ENV_ROOT)/$(ENV_KEY)
PY := .venv/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000
# Test files run in this many processes (pytest-xdist, one file per process at a time): much of the suite waits
# on workers, job processes and leases, so two processes finish it in about half the time even on two cores.
TEST_WORKERS ?= 2

.PHONY: install serve worker test test-fast lint browser-deps compose-deps bench clean-env

install: .venv/.installed-$(ENV_KEY) node_modules/.installed

$(ENV)/.complete:
	rm -rf $(ENV)
	$(PYTHON) -m venv $(ENV)
	$(ENV)/bin/pip install --quiet --upgrade pip
	$(ENV)/bin/pip install --quiet $(REQUIREMENTS)
	touch $@

# The checkout's .venv points at the shared environment; the project itself is installed editable
# from this checkout each time the link changes (a few seconds, no downloads).
.venv/.installed-$(ENV_KEY): $(ENV)/.complete
	ln -sfn $(ENV) .venv
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	rm -f .venv/.installed-*
	touch $@

# Chart library for the pages: installed from the npm registry, served from node_modules, never vendored.
node_modules/.installed: package.json
	npm install --no-audit --no-fund --loglevel=error
	touch $@

serve: install
	$(PY) -m app.cli serve --host $(HOST) --port $(PORT)

worker: install
	$(PY) -m app.cli worker

# Debian's Chromium for the browser tests (never `playwright install`: it downloads a browser).
browser-deps:
	@command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)

# Compose validates deploy/compose.yaml offline (`config`: no engine, no pulls): the Docker CLI's plugin when
# it is there, else Debian's docker-compose.
compose-deps:
	@docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker-compose >/dev/null)

test: install browser-deps compose-deps
	$(PY) -m ruff check finetune app tests bench
	$(PY) -m mypy
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test-fast: install
	$(PY) -m pytest -q -m "not slow and not browser"

lint: install
	$(PY) -m ruff check finetune app tests bench
	$(PY) -m ruff format --check finetune app tests bench
	$(PY) -m mypy

bench: install
	$(PY) -m bench all

clean-env:
	rm -rf $(ENV) .venv
