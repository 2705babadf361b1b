# The two commands: `make demo` and `make test`. Both go through `make setup` (idempotent).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Re-install only when the declared dependencies change.
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast bench gpu-check clean-demo

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, alone: pinned pair, so no other package can pull a different build.
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[dev]'
	# Test-only cross-check of our AutoAttack path; its declared requirements (an old requests,
	# any torchvision) would replace pinned packages, hence --no-deps.
	$(BIN)/pip install -q --no-deps torchattacks==3.5.1
	touch $(STAMP)

demo: setup
	$(BIN)/rftbench launch study=demo
	$(BIN)/rftbench collect study=demo
	$(BIN)/rftbench figures study=demo --out results/demo/figures

test: setup
	bash scripts/test.sh

test-fast: setup
	$(BIN)/pytest -m "not slow and not slurm" -q

bench: setup
	$(BIN)/python -m benchmarks

# On a GPU node, with an existing CUDA interpreter and a wheel folder (README: GPU check); no setup.
gpu-check:
	bash scripts/gpu-check.sh

clean-demo:
	rm -rf results/demo
