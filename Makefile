# Every target bootstraps what it needs: a virtualenv in .venv with the project installed
# (`pip install -e .[dev]`) and Debian's mosquitto (via apt-get when run as root).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench lint venv mosquitto chromium mlserver third-party-models clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

mosquitto:
	@if ! command -v mosquitto >/dev/null 2>&1 && ! test -x /usr/sbin/mosquitto; then \
	  if [ "$$(id -u)" = "0" ]; then \
	    echo "installing Debian's mosquitto"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto mosquitto-clients >/dev/null; \
	  else \
	    echo "mosquitto is missing: run 'sudo apt-get install mosquitto mosquitto-clients' and retry" >&2; exit 1; \
	  fi; \
	fi

# the dashboard's browser tests drive Debian's chromium through Playwright (no browser download);
# without it (and not root) they are skipped with a message
chromium:
	@if ! test -x /usr/bin/chromium; then \
	  if [ "$$(id -u)" = "0" ]; then \
	    echo "installing Debian's chromium"; \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	      echo "chromium could not be installed: the browser tests will be skipped" >&2; \
	  else \
	    echo "chromium is missing: the browser tests will be skipped ('sudo apt-get install chromium')" >&2; \
	  fi; \
	fi

# Seldon MLServer for its interoperability test, in a virtualenv of its own (its pins may clash
# with ours); when the install fails (offline) that test is skipped with a message
MLSERVER_VENV := .venv-mlserver
mlserver:
	@if ! test -e $(MLSERVER_VENV)/.installed; then \
	  echo "installing mlserver, mlserver-sklearn and scikit-learn into $(MLSERVER_VENV)"; \
	  { test -x $(MLSERVER_VENV)/bin/python || $(PYTHON) -m venv $(MLSERVER_VENV); } && \
	  $(MLSERVER_VENV)/bin/python -m pip install --quiet mlserver mlserver-sklearn scikit-learn && \
	  touch $(MLSERVER_VENV)/.installed || \
	  echo "MLServer could not be installed: its interoperability test will be skipped" >&2; \
	fi

# a real third-party ONNX model (PP-OCR's text-direction classifier, from PyPI's rapidocr-onnxruntime
# wheel, without its dependencies) for the int8 tests and bench/variants.py, in .cache/; when the
# download fails (offline) the tests that use it are skipped with a message
third-party-models: venv
	@$(PY) -m tests.helpers.third_party_models || \
	  echo "the third-party model could not be fetched: the tests that use it will be skipped" >&2

demo: venv mosquitto
	$(VENV)/bin/fleet demo

test: venv mosquitto chromium mlserver third-party-models
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: venv mosquitto third-party-models
	@for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) $(MLSERVER_VENV) .cache fleet-data .pytest_cache .ruff_cache .mypy_cache
