# Every target builds its own virtual environment; nothing relies on what the machine has installed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CORES ?= 2

.PHONY: venv smoke report smoke-slurm test lint clean-smoke

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

smoke: $(STAMP)
	$(BIN)/snakemake --workflow-profile workflow/profiles/smoke --cores $(CORES)

# The self-contained HTML report of the smoke run (every figure and table with its caption).
report: $(STAMP)
	$(BIN)/snakemake --workflow-profile workflow/profiles/smoke --report results/smoke/report.html

# The smoke DAG with every job submitted through the SLURM executor. SLURM_PROFILE holds the
# cluster's own settings, layered over workflow/profiles/slurm: by default the single-node test
# cluster of tests/slurm (default partition, no account, no accounting database); on a real
# cluster: make smoke-slurm SLURM_PROFILE=<your edited copy of workflow/profiles/slurm>.
# Results, logs and benchmarks go to */smoke-slurm/, next to `make smoke`'s */smoke/.
# `make smoke-slurm VENV=<path> STAMP=` runs it with an existing environment; SMOKE_SLURM_CONFIG
# adds `--config` entries, e.g. SMOKE_SLURM_CONFIG='classification="{select: [resnet]}"' (the
# tests run a subset).
SLURM_PROFILE ?= workflow/profiles/slurm-local
SMOKE_SLURM_CONFIG ?=
smoke-slurm: $(STAMP)
	$(BIN)/snakemake --profile workflow/profiles/slurm --profile $(SLURM_PROFILE) \
		--workflow-profile workflow/profiles/smoke --config scale=smoke-slurm $(SMOKE_SLURM_CONFIG)

test: $(STAMP)
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/snakefmt --check Snakefile workflow/rules
	$(BIN)/snakemake --lint --cores 1

clean-smoke:
	rm -rf results/smoke logs/smoke benchmarks/smoke
