# rnnserve: everything starts here. `make serve` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
HOST   ?= 127.0.0.1
PORT   ?= 50051
MODELS ?= models
# torch 2.13.0's CPU wheel lies on local disk on these machines; any other version downloads
# gigabytes of CUDA build. Installing it first makes the `train` extra's range a no-op.
TORCH  ?= torch==2.13.0

.PHONY: help venv install install-train serve test lint typecheck proto proto-check proto-lint models bench clean

help:
	@echo "make serve        set up .venv and serve the shipped models on $(HOST):$(PORT)"
	@echo "make test         set up .venv (with the train extra) and run lint, types and tests"
	@echo "make models       retrain and re-export the shipped models from scratch"
	@echo "make proto        regenerate the gRPC code from proto/rnnserve/v1/rnnserve.proto"
	@echo "make bench        run the benchmarks (results go to docs/benchmarks.md)"

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed pyproject.toml
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[train,dev]"
	touch $@

venv: $(VENV)/.installed
install: $(VENV)/.installed
install-train: $(VENV)/.installed-dev

serve: $(VENV)/.installed
	$(VENV)/bin/rnnserve serve --models $(MODELS) --host $(HOST) --port $(PORT)

test: $(VENV)/.installed-dev
	$(MAKE) lint typecheck proto-check proto-lint
	$(PY) -m pytest

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(VENV)/.installed-dev
	$(VENV)/bin/mypy

PROTOC := PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m grpc_tools.protoc -Iproto

proto: $(VENV)/.installed-dev
	$(PROTOC) --python_out=proto --grpc_python_out=proto --mypy_out=proto --mypy_grpc_out=proto \
		proto/rnnserve/v1/rnnserve.proto

# CI regenerates the code and fails when it differs from what is checked in.
proto-check: $(VENV)/.installed-dev
	@tmp=$$(mktemp -d) && \
	$(PROTOC) --python_out=$$tmp --grpc_python_out=$$tmp --mypy_out=$$tmp --mypy_grpc_out=$$tmp \
		proto/rnnserve/v1/rnnserve.proto && \
	for f in $$tmp/rnnserve/v1/*; do \
		cmp -s $$f proto/rnnserve/v1/$$(basename $$f) || \
		{ echo "proto/rnnserve/v1/$$(basename $$f) is stale: run make proto"; exit 1; }; \
	done; rm -rf $$tmp; echo "generated gRPC code is up to date"

# buf comes from the npm registry (@bufbuild/buf ships the binary). Without npm the lint is
# skipped with a note, unless REQUIRE_BUF=1 (CI sets it).
BUF_VERSION ?= 1.75.0
BUF := $(VENV)/buf/node_modules/.bin/buf

proto-lint:
	@if [ ! -x $(BUF) ] && command -v npm >/dev/null 2>&1; then \
		npm install --silent --no-audit --no-fund --prefix $(VENV)/buf @bufbuild/buf@$(BUF_VERSION); fi
	@if [ -x $(BUF) ]; then $(BUF) lint proto && echo "buf lint: clean"; \
	elif [ "$(REQUIRE_BUF)" = 1 ]; then echo "buf lint: npm is needed to install buf" >&2; exit 1; \
	else echo "buf lint: skipped (no npm to install buf with)"; fi

models: $(VENV)/.installed-dev
	$(VENV)/bin/rnnserve train all --out runs --models $(MODELS)

bench: $(VENV)/.installed-dev
	$(PY) bench/step_latency.py --out docs/benchmarks.md

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache runs
