# The two commands of the README: `make demo` (set up from nothing, run the main job) and
# `make test` (the whole test suite). Both install what they need themselves.
SHELL := /bin/bash
PY := .venv/bin/python
CHECKOV := .venv-checkov/bin/checkov
# jsii silences its Node end-of-life banner only when this holds the Node major version (measured: 1 does not).
export JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION := 20
export JSII_SILENCE_WARNING_DEPRECATED_NODE_VERSION := 1
export AWS_EC2_METADATA_DISABLED := true
# etcd 3.5.30 (etcd, etcdctl, etcdutl) from scripts/install-etcd.sh, ahead of anything the machine has.
export PATH := $(CURDIR)/.tools/etcd/usr/bin:$(PATH)

.PHONY: setup demo twin-demo test lint typecheck pytest synth policy chaos upgrade benchmark preflight clean

setup: .venv/.stamp .venv-checkov/.stamp node_modules/.stamp .system.stamp .tools/etcd/usr/bin/etcdutl

# Debian packages: shellcheck for the AMI component scripts (etcd comes from sid, below).
.system.stamp:
	@if ! command -v shellcheck >/dev/null; then \
	  echo "==> installing shellcheck (apt)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends shellcheck >/dev/null; \
	fi
	@touch $@

# Real etcd 3.5.30 for the tests and the twin (production runs 3.6; bookworm's 3.4 has no etcdutl).
.tools/etcd/usr/bin/etcdutl: scripts/install-etcd.sh
	@bash scripts/install-etcd.sh .tools/etcd
	@touch $@

.venv/.stamp: requirements.txt
	@echo "==> python venv (.venv) from requirements.txt"
	@test -x $(PY) || python3 -m venv .venv
	@$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	@touch $@

# checkov pins an older boto3 than the project, so it lives in its own venv.
.venv-checkov/.stamp: requirements-checkov.txt
	@echo "==> checkov venv (.venv-checkov) from requirements-checkov.txt"
	@test -x .venv-checkov/bin/python || python3 -m venv .venv-checkov
	@.venv-checkov/bin/python -m pip install -q --disable-pip-version-check -r requirements-checkov.txt
	@touch $@

node_modules/.stamp: package.json package-lock.json
	@echo "==> CDK CLI (npm ci)"
	@npm ci --no-fund --no-audit --loglevel=error
	@touch $@

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

typecheck: setup
	$(PY) -m mypy .

pytest: setup
	$(PY) -m pytest -n 2 --dist loadgroup -q

test: lint typecheck pytest

synth: setup
	@$(PY) -m scripts.synth_and_check --synth-only

policy: setup
	@$(PY) -m scripts.synth_and_check

demo: setup
	@$(PY) -m scripts.synth_and_check
	@$(PY) -m scripts.demo

# The local cluster twin alone: bootstrap, the canary's rolling replacement, reports/demo-report.json + timeline.png.
twin-demo: setup
	@$(PY) -m scripts.demo

# A long chaos run on the twin: make chaos N=500 SEED=7 (report in reports/chaos-report.json).
N ?= 500
SEED ?= 1
chaos: setup
	@$(PY) -m twin.chaos --count $(N) --seed $(SEED) --dr

# An upgrade by replacement on the twin: N -> N+1 through pipeline/rollout.py (reports/upgrade-report.json).
upgrade: setup
	@$(PY) -m twin.upgrade

# Read-only checks of the target account before a deploy, with your credentials (README "First deploy"):
# make preflight REGION=us-east-1 [ACCOUNT=111111111111] [CONTEXT="irsa=true vpcId=vpc-..."] [OUTPUT=json]
preflight: setup
	@$(PY) -m pipeline.preflight $(if $(REGION),--region $(REGION)) $(if $(ACCOUNT),--account $(ACCOUNT)) \
	  $(foreach c,$(CONTEXT),--context $(c)) $(if $(OUTPUT),-o $(OUTPUT))

# Handler latency per lifecycle event on real etcd (median, p95 over 50 events) and the import time.
benchmark: setup
	@$(PY) -m scripts.benchmark_lifecycle --events 50

clean:
	rm -rf cdk.out build reports .pytest_cache .mypy_cache .ruff_cache
