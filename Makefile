PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run cluster test lint format bench install clean

## run: set everything up and serve the chat on port $(PORT) (default 8080; SERVER=uvicorn for the fast option)
run: $(STAMP)
	VENV=$(VENV) bin/serve

## cluster: $(WORKERS) workers (default 2) on Redis and PostgreSQL, ports 8081.. (see README)
cluster: $(STAMP)
	VENV=$(VENV) bin/cluster

## test: the whole test suite
test: $(STAMP)
	$(BIN)/pytest

## bench: the benchmark against the yardstick (QUICK=1 for a run under 2 minutes)
bench: $(STAMP)
	$(BIN)/python bench/run.py $(if $(QUICK),--quick) $(BENCH_ARGS)

## lint: ruff check and format check
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

install: $(STAMP)

$(STAMP): requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	touch $(STAMP)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
