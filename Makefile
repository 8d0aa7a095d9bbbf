# Thin wrappers; the README names them. Each target creates .venv and installs what it needs. `make help` lists them.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Every install is constrained by the lock (`make lock` regenerates it): the same versions on every machine.
LOCK   := constraints.txt
PIP    := $(BIN)/python -m pip install --quiet --disable-pip-version-check --constraint $(LOCK)
# What `make lint` checks: ruff over all of it, mypy over the packages and tools (service/ strictly, per pyproject).
LINT_PATHS  := service training bench scripts tests examples
TYPED_PATHS := service training bench scripts
# Where `make run` listens: `make run PORT=9000 HOST=0.0.0.0` (make variables win), else the service's own
# MNIST_SERVE_PORT / MNIST_SERVE_HOST from the environment, else 127.0.0.1:8000.
HOST   := $(or $(MNIST_SERVE_HOST),127.0.0.1)
PORT   := $(or $(MNIST_SERVE_PORT),8000)

.PHONY: help run test test-slow test-containers train train-seed quantize smoke lint example lock proto bench clean
.DEFAULT_GOAL := help

## help: list the targets, one line each (this list)
help:
	@awk -v host='$(HOST)' -v port='$(PORT)' '/^## [a-z-]+:/ { sub(/^## /, ""); name = $$0; sub(/:.*/, "", name); \
	  text = $$0; sub(/^[^:]*: */, "", text); gsub(/\$$\(HOST\)/, host, text); gsub(/\$$\(PORT\)/, port, text); \
	  printf "  %-16s %s\n", name, text }' $(firstword $(MAKEFILE_LIST))
	@echo "  make run PORT=9000 HOST=0.0.0.0, or MNIST_SERVE_PORT=9000 make run: listen elsewhere"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Stamps record which extras are installed; a change to pyproject.toml or the lock re-installs. pip itself comes
# from the lock first, so that it knows --build-constraint (the build backend's version, from the lock too).
$(VENV)/.serve: pyproject.toml $(LOCK) | $(BIN)/python
	$(PIP) --upgrade pip
	$(PIP) --build-constraint $(LOCK) -e '.[serve]'
	touch $@

$(VENV)/.dev: pyproject.toml $(LOCK) | $(BIN)/python
	$(PIP) --upgrade pip
	$(PIP) --build-constraint $(LOCK) -e '.[dev]'
	touch $@ $(VENV)/.serve

# checkov (tests/deploy) gets its own environment: it pins packaging<24, networkx<2.7, boto3==... which would
# fight TensorFlow's requirements in .venv.
# Its own lock, too (constraints-checkov.txt, from `make lock`).
CHECKOV_VERSION := 3.3.30
CHECKOV_VENV    := .venv-checkov
CHECKOV_LOCK    := constraints-checkov.txt
$(CHECKOV_VENV)/.installed-$(CHECKOV_VERSION): $(CHECKOV_LOCK)
	$(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/python -m pip install --quiet --disable-pip-version-check --constraint $(CHECKOV_LOCK) \
	  'checkov==$(CHECKOV_VERSION)'
	touch $@

## run: serve the committed model on http://$(HOST):$(PORT)
run: $(VENV)/.serve
	MNIST_SERVE_HOST=$(HOST) MNIST_SERVE_PORT=$(PORT) $(BIN)/mnist-serve

## test: the default suite (fast; no full training, no containers)
test: $(VENV)/.dev $(CHECKOV_VENV)/.installed-$(CHECKOV_VERSION)
	$(BIN)/python -m pytest -m "not slow and not containers"

## test-slow: long-running tests (soak, full-data checks)
test-slow: $(VENV)/.dev
	$(BIN)/python -m pytest -m "slow and not containers"

## test-containers: build the image, docker compose up, predict, check Prometheus, tear down
# (installs podman through ../shared/container/setup when no engine is found)
test-containers: $(VENV)/.dev
	$(BIN)/python -m pytest tests/deploy -m containers

## train: train the shipped CNN (full schedule), evaluate, export the calibrated models/mnist-cnn.onnx + card, quantize, fit the verdict and write docs/trust.md
train: $(VENV)/.dev
	$(BIN)/mnist-train --model cnn
	$(BIN)/mnist-evaluate --run runs/cnn --docs docs
	$(BIN)/mnist-export --run runs/cnn --out models
	$(BIN)/mnist-quantize || echo "no int8 model written: it must keep the accuracy and be faster (a stale models/mnist-cnn-int8.* fails the tests)"
	$(BIN)/python -m training.trust --models models --docs docs

## quantize: models/mnist-cnn-int8.onnx + card (static int8), written only if as accurate and faster; then both cards' trust figures
quantize: $(VENV)/.dev
	$(BIN)/mnist-quantize
	$(BIN)/python -m training.trust --models models --docs docs

## train-seed: the published baseline, for comparison
train-seed: $(VENV)/.dev
	$(BIN)/mnist-train --model seed
	$(BIN)/mnist-evaluate --run runs/seed --docs docs

## smoke: the whole pipeline on a tiny model (train, evaluate, export, quantize, trust) into runs/cnn-smoke, not models/
smoke: $(VENV)/.dev
	$(BIN)/mnist-train --model cnn --smoke
	$(BIN)/mnist-evaluate --run runs/cnn-smoke
	$(BIN)/mnist-export --run runs/cnn-smoke --out runs/cnn-smoke/export
	$(BIN)/mnist-quantize --models runs/cnn-smoke/export --calibration-images 200 --force
	$(BIN)/python -m training.trust --models runs/cnn-smoke/export --docs runs/cnn-smoke/docs --cost-rounds 1

## lint: the CI gate: ruff format --check, ruff check and mypy (strict on service/)
lint: $(VENV)/.dev
	$(BIN)/ruff format --check $(LINT_PATHS)
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/mypy $(TYPED_PATHS)

## example: classify 100 test digits with tritonclient (examples/triton_client.py) against the server `make run` started
example: $(VENV)/.dev
	$(BIN)/python examples/triton_client.py --url $(HOST):$(PORT)

## lock: regenerate the locks (constraints.txt, constraints-checkov.txt) after a dependency change
lock: | $(BIN)/python
	$(BIN)/python scripts/lock.py --checkov $(CHECKOV_VERSION)

## proto: regenerate service/grpc_gen (the gRPC service's Python, committed) from the protos in service/proto
proto: $(VENV)/.dev
	$(BIN)/python scripts/gen_proto.py

## bench: the service against in-process onnxruntime and a naive endpoint, in one run (docs/performance.md)
# Load comes from wrk, which it installs from Debian when it can (root with apt-get); without wrk it stops and says so.
bench: $(VENV)/.dev
	@command -v wrk >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (apt-get install -y -qq wrk >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq wrk >/dev/null)); } || \
	  echo "wrk is not installed: install it (Debian: apt-get install wrk) to run the benchmark"
	$(BIN)/python -m bench.run

## clean: remove training runs, caches and test artifacts (not .venv)
clean:
	rm -rf runs .pytest_cache .mypy_cache .ruff_cache test-artifacts
