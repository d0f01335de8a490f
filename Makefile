# Two entry points, each installs what it needs on a fresh machine:
#   make demo   - builds the sample library and runs ckptlab over it
#   make test   - lint + the core-only check + the whole test suite
# make core-check: `pip install ckptlab` without extras in its own venv (.venv-core, kept between runs like
# .venv) runs the core commands on sample files with no torch (scripts/core_check.sh).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/ckptlab: pyproject.toml requirements-dev.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements-dev.txt
	$(BIN)/pip install -q -c requirements-dev.txt -e '.[dev]'
	touch $(BIN)/ckptlab

venv: $(BIN)/ckptlab

CORE_VENV := .venv-core

# the core alone, pinned to the dev versions; editable, so it always runs this checkout's src
$(CORE_VENV)/bin/ckptlab: pyproject.toml requirements-dev.txt
	rm -rf $(CORE_VENV)
	$(PY) -m venv $(CORE_VENV)
	$(CORE_VENV)/bin/pip install -q --upgrade pip
	$(CORE_VENV)/bin/pip install -q -c requirements-dev.txt -e .
	touch $(CORE_VENV)/bin/ckptlab

core-venv: $(CORE_VENV)/bin/ckptlab

core-check: venv core-venv
	bash scripts/core_check.sh

# the web app's end-to-end tests drive Debian's chromium (Playwright's own browser download is not reachable)
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null 2>&1 || { $(SUDO) apt-get update -q && \
		$(SUDO) apt-get install -y -q --no-install-recommends chromium; }

# hub scale tests: PostgreSQL from Debian's package (the tests run initdb in a temporary folder as an unprivileged
# user and start it on a private loopback port; moto's S3 server and the Ray cluster come from the venv)
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { $(SUDO) apt-get update -q && \
		$(SUDO) apt-get install -y -q --no-install-recommends postgresql; }

demo: venv
	bash scripts/demo.sh sample-library

lint: venv
	$(BIN)/ruff check src tests benchmarks

test: lint core-check browser postgres
	$(BIN)/python -m pytest -n 2 --dist loadgroup -q tests

.PHONY: venv core-venv core-check browser postgres demo lint test
