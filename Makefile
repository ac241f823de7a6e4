# Every target builds its own virtual environment; nothing relies on what the machine has installed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CORES ?= 2

.PHONY: venv smoke report smoke-slurm rehearsal test lint docs clean-smoke

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[pipeline,test]'
	touch $(STAMP)

# A Snakemake killed with SIGKILL leaves its lock behind: stablenets.pipeline.locks removes it first, but
# only when no Snakemake or job of the workflow still runs in this directory (one line says
# which). SMOKE_CONFIG adds `--config` entries, as SMOKE_SLURM_CONFIG below (tests run subsets).
SMOKE_CONFIG ?=
SMOKE_ARGS = --workflow-profile workflow/profiles/smoke --cores $(CORES) \
	$(if $(SMOKE_CONFIG),--config $(SMOKE_CONFIG))
smoke: $(STAMP)
	$(BIN)/python -m stablenets.pipeline.locks $(SMOKE_ARGS)
	$(BIN)/snakemake $(SMOKE_ARGS)

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
SMOKE_SLURM_ARGS = --profile workflow/profiles/slurm --profile $(SLURM_PROFILE) \
	--workflow-profile workflow/profiles/smoke --config scale=smoke-slurm $(SMOKE_SLURM_CONFIG)
smoke-slurm: $(STAMP)
	$(BIN)/python -m stablenets.pipeline.locks $(SMOKE_SLURM_ARGS)
	$(BIN)/snakemake $(SMOKE_SLURM_ARGS)

# The rehearsal (README "Rehearsal scale"): every kind of job of the paper DAG at the paper's
# sizes on one GPU (about 7 minutes on an H200), then results/rehearsal/cost.{csv,md}: measured
# cost per job and the projected hours of config.yaml's DAG. REHEARSAL_CONFIG adds `--config`
# entries, e.g. REHEARSAL_CONFIG='device=cuda:1' (Snakemake reads nested values as strings: edit
# config/rehearsal.yaml for those, as tests/test_rehearsal.py does); the stale-lock step as for
# `make smoke`.
REHEARSAL_CONFIG ?=
REHEARSAL_ARGS = --workflow-profile workflow/profiles/rehearsal \
	$(if $(REHEARSAL_CONFIG),--config $(REHEARSAL_CONFIG))
rehearsal: $(STAMP)
	$(BIN)/python -m stablenets.pipeline.locks $(REHEARSAL_ARGS)
	$(BIN)/snakemake all_with_cost $(REHEARSAL_ARGS)

test: $(STAMP)
	$(BIN)/pytest -q

# tests/test_layers.py: the layering contract (nn < evaluation, data < train < pipeline < bench)
# and the library's imports without the pipeline extra; basedpyright: the types (pyproject.toml).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/snakefmt --check Snakefile workflow/rules
	$(BIN)/snakemake --lint --cores 1
	$(BIN)/pytest -q tests/test_layers.py
	$(BIN)/basedpyright

# The reference documentation from the docstrings (mkdocs.yml), into site/; any warning fails.
docs: $(STAMP)
	$(BIN)/mkdocs build --strict

clean-smoke:
	rm -rf results/smoke logs/smoke benchmarks/smoke
