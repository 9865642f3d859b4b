# `make test` sets up everything it needs: a .venv with kira and its dev tools.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev

CLI_STAMP := $(VENV)/.installed-cli
DEMO_DB := demo-trip.db

.PHONY: demo test lint typecheck unit graphviz bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[dev,dask,cli]'
	touch $(STAMP)

$(CLI_STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[cli]'
	touch $(CLI_STAMP)

# Book a trip on a fresh SQLite file, then book it again with the payment failing
# for good: kira rolls everything back (exit status 1, which is the point here).
demo: $(CLI_STAMP)
	@rm -f $(DEMO_DB) $(DEMO_DB)-wal $(DEMO_DB)-shm
	@echo "== 1. a trip booking that succeeds =="
	$(BIN)/kira run examples/trip_booking.py --set db=$(DEMO_DB)
	@echo
	@echo "== 2. the same booking, the payment service refusing every attempt =="
	@$(BIN)/kira run examples/trip_booking.py --set db=$(DEMO_DB) --set fail=payment; \
	    status=$$?; echo; \
	    if [ $$status -eq 1 ]; then \
	        echo "kira rolled the booking back: every seat, room and car is free again in $(DEMO_DB)."; \
	    else echo "unexpected exit status $$status"; exit 1; fi

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples

typecheck: $(STAMP)
	$(BIN)/mypy

# `kira graph --output` renders through Graphviz, and its test needs the real
# `dot`: installed here where that can be done unattended (root on Debian)
graphviz:
	@command -v dot >/dev/null 2>&1 || { \
	    if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	        echo "installing Graphviz (apt-get install graphviz) for the rendering test"; \
	        apt-get update -qq && apt-get install -y -qq graphviz >/dev/null; \
	    else \
	        echo "make test needs Graphviz's dot on PATH: apt-get install graphviz" \
	            "(Debian, Ubuntu), brew install graphviz (macOS)"; \
	        exit 1; \
	    fi; }

# `timeout`: pytest-timeout guards each test, not the interpreter's exit; 10 minutes
# keep the whole CI run (venv, install, lint, tests, acceptance) under its 15
unit: $(STAMP) graphviz
	timeout --kill-after=30 600 $(BIN)/python -m pytest -q

test: lint typecheck unit

bench: $(STAMP)
	$(BIN)/python benchmarks/state_machine.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache $(DEMO_DB)*
