# Two commands: `make up` serves the demo models; `make test` runs the whole suite.
# Both create .venv, install pinned dependencies (constraints.txt; torch pinned to the
# 2.13.0 CPU wheel) and build the demo model artifacts when missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: up test install models redis prometheus haproxy podman lint fmt clean bench fuzz kuberay

$(STAMP): pyproject.toml constraints.txt
	@echo "[make] creating $(VENV) and installing pinned dependencies (first run takes minutes)"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt 'torch==2.13.0'
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev,cpu]'
	@touch $@

install: $(STAMP)

# Demo models are trained here from bundled/seeded data; build.py skips those present.
models: install
	$(BIN)/python -m models.build

redis: install
	$(BIN)/serving redis ensure

up: models redis
	$(BIN)/serving up

# The observability tests run a real Prometheus (and promtool): Debian's package.
prometheus:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || { \
	  echo "[make] installing Debian's prometheus package"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }

# The multi-node tests put Debian's haproxy in front of the cluster's front doors.
haproxy:
	@command -v haproxy >/dev/null || { \
	  echo "[make] installing Debian's haproxy package"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -qq --no-install-recommends haproxy >/dev/null; }

# The image tests build and run the CPU image with Debian's podman (runc, no daemon) on
# a base made with debootstrap: no container registry is reachable from the build machine.
podman:
	@command -v podman >/dev/null && command -v runc >/dev/null && command -v debootstrap >/dev/null || { \
	  echo "[make] installing Debian's podman, runc and debootstrap packages"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -qq --no-install-recommends podman runc debootstrap fuse-overlayfs slirp4netns uidmap >/dev/null; }

test: models prometheus haproxy podman
	$(BIN)/python -m pytest -q -ra --durations=25 tests

# The fuzz tests with many more examples, randomized (make test runs them derandomized).
fuzz: models
	SERVING_FUZZ_EXAMPLES=$${SERVING_FUZZ_EXAMPLES:-2000} SERVING_FUZZ_RANDOM=1 \
		$(BIN)/python -m pytest -q -ra tests/e2e/test_fuzz.py

bench: models
	$(BIN)/python -m loadtests

# The KubeRay manifests: the RayService rendered from deployments/local.yaml, and the
# Grafana dashboard the kustomization ships (a test checks both are current).
kuberay: models
	$(BIN)/serving config render --format rayservice > deployments/kuberay/rayservice.yaml
	cp deployments/grafana/dashboards/serving.json deployments/kuberay/dashboards/

lint: install
	$(BIN)/ruff check serving tests loadtests models
	$(BIN)/mypy serving

fmt: install
	$(BIN)/ruff format serving tests loadtests models

clean:
	rm -rf $(VENV) models/fraud models/digits .pytest_cache .mypy_cache .ruff_cache
