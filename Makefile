# rnnserve: everything starts here. `make serve` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
HOST   ?= 127.0.0.1
PORT   ?= 50051
# /metrics port: 0 picks a free one, -1 turns the endpoint off (a second server: METRICS_PORT=0).
METRICS_PORT ?= 9464
MODELS ?= models
# torch 2.13.0's CPU wheel lies on local disk on these machines; any other version downloads
# gigabytes of CUDA build. Installing it first makes the `train` extra's range a no-op.
TORCH  ?= torch==2.13.0

.PHONY: help venv install install-train serve test test-long test-compat lint typecheck proto proto-check proto-lint models bench bench-frames bench-ab bench-instructions bench-memory bench-startup clean

help:
	@echo "make serve        set up .venv and serve the shipped models on $(HOST):$(PORT)"
	@echo "make test         set up .venv (with the train extra) and run lint, types and tests"
	@echo "make test-long    the load and soak tests (minutes; docs/reliability.md)"
	@echo "make models       retrain and re-export the shipped models from scratch"
	@echo "make proto        regenerate the gRPC code from the .proto files under proto/"
	@echo "make test-compat  run part of the tests on the oldest supported protobuf and grpcio"
	@echo "make bench        run the benchmarks (results go to docs/benchmarks.md)"
	@echo "make bench-frames (also bench-ab, bench-instructions, bench-memory, bench-startup) one more"
	@echo "make image        build the server image rnnserve:latest (podman or docker)"
	@echo "make image-test   build the test images on a local Debian base and run the container tests"

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e ".[fast]"
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed pyproject.toml
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[train,dev]"
	touch $@

venv: $(VENV)/.installed
install: $(VENV)/.installed
install-train: $(VENV)/.installed-dev

serve: $(VENV)/.installed
	$(VENV)/bin/rnnserve serve --models $(MODELS) --host $(HOST) --port $(PORT) \
		--metrics-port $(METRICS_PORT)

test: $(VENV)/.installed-dev
	$(MAKE) lint typecheck proto-check proto-lint
	$(PY) -m pytest
	$(MAKE) test-compat

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(VENV)/.installed-dev
	$(VENV)/bin/mypy

# The code generator has an environment of its own: protoc 30.0 (grpcio-tools 1.72.1) writes
# Python that runs on protobuf 6.30 and later, 7 included (a newer protoc's output requires 7),
# and gRPC code that runs on grpcio 1.72.1 and later. These set the floors in pyproject.toml.
PROTOC_TOOLS ?= grpcio-tools==1.72.1 mypy-protobuf==5.1.0
PROTOC_VENV  := $(VENV)/protoc
PROTOC_STAMP := $(PROTOC_VENV)/.installed-grpcio-tools-1.72.1
PROTOC := PATH=$(CURDIR)/$(PROTOC_VENV)/bin:$$PATH $(PROTOC_VENV)/bin/python -m grpc_tools.protoc -Iproto
PROTO_DIRS := rnnserve/v1 inference
PROTOS := $(foreach d,$(PROTO_DIRS),$(wildcard proto/$(d)/*.proto))

$(PROTOC_STAMP):
	test -x $(PROTOC_VENV)/bin/python || $(PYTHON) -m venv $(PROTOC_VENV)
	$(PROTOC_VENV)/bin/pip install -q $(PROTOC_TOOLS)
	touch $@

# $(call protogen,OUT): generate every .proto's Python, gRPC and type-stub code under OUT.
# The Open Inference Protocol's messages go into a descriptor pool of their own (the sed), not
# protobuf's default pool: tritonclient, KServe and MLServer put the same `inference.*` names in
# the default pool, and a second definition of a name there fails at import ("duplicate symbol
# 'inference.ServerLiveRequest'"), so rnnserve's server and Triton's client could not share a
# process.
protogen = $(PROTOC) --python_out=$(1) --grpc_python_out=$(1) --mypy_out=$(1) \
	--mypy_grpc_out=$(1) $(PROTOS) && \
	sed -i 's/_descriptor_pool.Default()/_descriptor_pool.DescriptorPool()/' \
		$(1)/inference/grpc_service_pb2.py

proto: $(PROTOC_STAMP)
	$(call protogen,proto)

# CI regenerates the code and fails when it differs from what is checked in.
proto-check: $(PROTOC_STAMP)
	@tmp=$$(mktemp -d) && { $(call protogen,$$tmp); } 2>/dev/null && \
	for d in $(PROTO_DIRS); do for f in $$tmp/$$d/*; do \
		cmp -s $$f proto/$$d/$$(basename $$f) || \
		{ echo "proto/$$d/$$(basename $$f) is stale: run make proto"; exit 1; }; \
	done; done; rm -rf $$tmp; echo "generated gRPC code is up to date"

# Load and soak (tests/robustness/test_soak.py, marker `long`; minutes): not in `make test`.
test-long: $(VENV)/.installed-dev
	$(PY) -m pytest -m long -s tests/robustness

# The oldest dependencies rnnserve declares (protobuf 6.30.0, grpcio 1.72.1) in a second
# environment, on a representative part of the suite (noxfile.py); `make test` runs the newest.
test-compat: $(VENV)/.installed-dev
	$(VENV)/bin/nox --no-error-on-missing-interpreters -s lowest

# buf comes from the npm registry (@bufbuild/buf ships the binary). Without npm the lint is
# skipped with a note, unless REQUIRE_BUF=1 (CI sets it).
BUF_VERSION ?= 1.75.0
# The contract as released before frames: every change since must stay wire- and
# source-compatible with it (buf's FILE rules), so existing apps keep working.
CONTRACT_BASELINE := tests/fixtures/contract-v1
BUF := $(VENV)/buf/node_modules/.bin/buf

proto-lint:
	@if [ ! -x $(BUF) ] && command -v npm >/dev/null 2>&1; then \
		npm install --silent --no-audit --no-fund --prefix $(VENV)/buf @bufbuild/buf@$(BUF_VERSION); fi
	@if [ -x $(BUF) ]; then $(BUF) lint proto && echo "buf lint: clean" && \
		$(BUF) breaking proto --against $(CONTRACT_BASELINE) && \
		echo "buf breaking: compatible with $(CONTRACT_BASELINE)"; \
	elif [ "$(REQUIRE_BUF)" = 1 ]; then echo "buf lint: npm is needed to install buf" >&2; exit 1; \
	else echo "buf lint: skipped (no npm to install buf with)"; fi

models: $(VENV)/.installed-dev
	$(VENV)/bin/rnnserve train all --out runs --models $(MODELS)

bench: $(VENV)/.installed-dev
	$(PY) bench/step_latency.py --out docs/benchmarks.md

# The rest of the suite (bench/README.md); each writes its own section of docs/benchmarks.md.
bench-frames bench-ab bench-instructions bench-startup: bench-%: $(VENV)/.installed-dev
	$(PY) bench/$*.py --out docs/benchmarks.md
bench-memory: $(VENV)/.installed-dev
	$(PY) bench/memory.py

# Containers (docs/deployment.md). deploy/containers/engine.sh is podman, else docker, with what
# this host needs. IMAGE_BASE=localhost/rnnserve-base:bookworm builds on the local base.
IMAGE      ?= rnnserve:latest
IMAGE_BASE ?= python:3.11-slim
.PHONY: image wheelhouse image-test

image:
	deploy/containers/engine.sh build --build-arg BASE=$(IMAGE_BASE) -t $(IMAGE) .

# The image's runtime dependencies and build backend as wheels: with wheels/ in the build
# context the image installs from it without the package index. Resolved by the Python the
# local base runs (Debian bookworm's 3.11.2): markers like python_full_version < "3.11.3"
# (redis needs async-timeout there) depend on it.
WHEEL_PYTHON ?= /usr/bin/python3

wheelhouse:
	rm -rf wheels build/wheelhouse-venv
	$(WHEEL_PYTHON) -m venv build/wheelhouse-venv
	build/wheelhouse-venv/bin/pip wheel -q ".[fast]" hatchling -w wheels
	rm -rf build/wheelhouse-venv

# The local Debian base (mmdebstrap), the wheelhouse, the server and compose test images, then
# the tests that start them (tests/containers, marker `containers`).
image-test: $(VENV)/.installed-dev wheelhouse
	nice -n 19 deploy/containers/images.sh all
	$(PY) -m pytest -m containers tests/containers

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache runs
