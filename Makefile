# kpr: `make demo` shows it working on the built-in lab, `make test` runs every test tier.
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: help setup k8s demo test unit lint soak bench image clean

help:
	@echo "make demo   - set up, then load balance a Service in the lab namespaces and show kpr services"
	@echo "make demo MODE=chaining - the same with the client pod chained by kpr-cni (per-packet LB at its veth)"
	@echo "make demo MODE=kubernetes - kpr on the real Kubernetes control plane: kubectl, a Deployment, a rollout"
	@echo "make test   - set up, then lint and run every tier (unit, datapath, agent, real Kubernetes)"
	@echo "make k8s    - build the pinned Kubernetes release's binaries into .cache/k8s/bin (once; then cached)"
	@echo "make unit   - the tests that need no root"
	@echo "make lint   - ruff and mypy"
	@echo "make soak   - the chaos soak for 30 minutes: steady traffic under random faults, then the table of faults"
	@echo "              survived (SOAK_SECONDS=1800, SOAK_SEED=N replays a run)"
	@echo "make bench  - kpr vs kube-proxy iptables/nftables vs the pod IP, and the UDP socket sweep at 10k sockets;"
	@echo "              writes docs/benchmarks/ (BENCH_ARGS=--quick)"
	@echo "make image  - build the container image (deploy/Containerfile) with buildah, no registry needed: a"
	@echo "              debootstrapped Debian base (.cache/image/), then a check that it loads the programs"
	@echo "make clean  - remove the venv and any lab left behind by a killed run"

setup:
	@bash scripts/setup.sh all

# The real Kubernetes components for the lab (go build from the module proxy; a no-op once cached).
k8s:
	@bash scripts/k8s-build.sh

demo: setup $(if $(filter kubernetes,$(MODE)),k8s)
	$(PY) -m kpr.lab.demo $(if $(MODE),--mode $(MODE))

test: setup k8s lint
	$(PY) -m pytest $(PYTEST_ARGS) tests

unit: setup
	$(PY) -m pytest -m unit $(PYTEST_ARGS) tests

lint: setup
	$(PY) -m ruff check kpr tests bench
	$(PY) -m mypy kpr

SOAK_SECONDS ?= 1800
soak: setup
	$(PY) -m pytest $(PYTEST_ARGS) tests/e2e/test_soak.py -m soak --soak-seconds $(SOAK_SECONDS) $(if $(SOAK_SEED),--soak-seed $(SOAK_SEED)) -s

bench: setup
	$(PY) -m pip install -q --disable-pip-version-check -e '.[bench]'
	$(PY) bench/run.py $(BENCH_ARGS)
	$(PY) bench/socket_sweep.py

# Not part of `make test`: it fetches Debian packages and PyPI wheels (about 1.5 minutes the first time).
image:
	@bash scripts/image.sh

clean:
	-[ -x $(PY) ] && $(PY) -c 'from kpr.lab import sweep_stale; sweep_stale()'
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
