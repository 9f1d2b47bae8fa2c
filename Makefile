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
	@# Started as root, the host runs as [host] user (default mailpool): create it if missing.
	@if [ "$$(id -u)" = 0 ] && ! id mailpool >/dev/null 2>&1; then \
		useradd --system --no-create-home --shell /usr/sbin/nologin mailpool \
		|| echo "note: could not create the mailpool user; set [host] user"; fi
	touch $(STAMP)

# Started as root the host runs as the mailpool user; where that user cannot reach this
# Python (installed under a private home, e.g. pyenv in /root) it stays root, and says so.
run: $(STAMP)
	@if [ "$$(id -u)" = 0 ] && ! runuser -u mailpool -- $(PY) -c '' 2>/dev/null; then \
		echo "note: user mailpool cannot run $(PY) (a private directory): serving as root"; \
		exec $(VENV)/bin/mailpool serve --config $(CONFIG) --user root; fi; \
	exec $(VENV)/bin/mailpool serve --config $(CONFIG)

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
