# Two commands for a newcomer: `make run` (serve with demo data) and `make test` (the whole suite).
# `make run` installs only the runtime set; `make test`, `make lint` and `make bench` add the dev tools.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 8000
HOST ?= 127.0.0.1

.PHONY: install install-dev run test lint bench seed clean

# Two sets (docs/deploy.md): requirements.txt is what the server needs (`make run`, production);
# requirements-dev.txt adds the test, benchmark and lint tools. Each has its own stamp, so `make run` never
# waits for playwright or schemathesis. --no-compile: modules compile on first import instead, only those used.
PIP_INSTALL = $(PY) -m pip install --quiet --disable-pip-version-check --no-compile

$(VENV)/.installed-runtime: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) -r requirements.txt
	touch $@

$(VENV)/.installed-dev: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) -r requirements-dev.txt
	touch $(VENV)/.installed-runtime $@

install: $(VENV)/.installed-runtime

install-dev: $(VENV)/.installed-dev

# Dev server: DEBUG on (plain-HTTP cookies), SQLite and the demo provider unless DATABASE_URL/REDIS_URL are set.
run: install
	DEBUG=$${DEBUG:-1} $(PY) manage.py migrate --noinput
	DEBUG=$${DEBUG:-1} PORT=$(PORT) $(PY) manage.py seed_demo
	DEBUG=$${DEBUG:-1} $(PY) -m aiwriter.serve -b $(HOST) -p $(PORT) aiwriter.asgi:application

test: install-dev
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy .
	$(PY) manage.py makemigrations --check --dry-run

bench: install-dev
	$(PY) -m bench.run

clean:
	rm -rf $(VENV) db.sqlite3 var staticfiles
