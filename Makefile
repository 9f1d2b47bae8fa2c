# mailpool: `make run` starts the host on config/mailpool.toml; `make test` runs the suite.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONFIG ?= config/mailpool.toml

.PHONY: run test lint bench peers clean

$(PY):
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/mailpool serve --config $(CONFIG)

# Debian tools the tests drive (swaks, fetchmail, Postfix's smtp-sink); skipped by the tests with a reason
# when they cannot be installed here.
peers:
	-@bash tests/install_tools.sh

test: $(STAMP) peers
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench

bench: $(STAMP)
	$(PY) -m bench.run

clean:
	rm -rf $(VENV) var build src/*.egg-info
