# Every target builds its own virtual environment; nothing relies on what the machine has installed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CORES ?= 2

.PHONY: venv smoke report smoke-slurm rehearsal device-kit test lint docs clean-smoke

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[pipeline,test]'
	touch $(STAMP)

# stablenets.pipeline.config first reads the config files the profile passes (a YAML error: one line
# naming the file, where Snakemake's names none). A Snakemake killed with SIGKILL leaves its lock
# behind: stablenets.pipeline.locks removes it first, but
# only when no Snakemake or job of the workflow still runs in this directory (one line says
# which). SMOKE_CONFIG adds `--config` entries, as SMOKE_SLURM_CONFIG below (tests run subsets).
SMOKE_CONFIG ?=
SMOKE_ARGS = --workflow-profile workflow/profiles/smoke --cores $(CORES) \
	$(if $(SMOKE_CONFIG),--config $(SMOKE_CONFIG))
smoke: $(STAMP)
	$(BIN)/python -m stablenets.pipeline.config $(SMOKE_ARGS)
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
	$(BIN)/python -m stablenets.pipeline.config $(SMOKE_SLURM_ARGS)
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
	$(BIN)/python -m stablenets.pipeline.config $(REHEARSAL_ARGS)
	$(BIN)/python -m stablenets.pipeline.locks $(REHEARSAL_ARGS)
	$(BIN)/snakemake all_with_cost $(REHEARSAL_ARGS)

# What a lent GPU lacks to run `make rehearsal` (benchmarks/README.md "Rehearsal on a lent GPU"),
# into DEVICE_KIT (ignored; the device call names it in `carry`), then its size (what travels is
# 64 MiB at most, the checkout's 1 MB included). whl/: wheels for the device's python3 (CPython
# 3.12, x86-64 Linux) of Snakemake, jsonschema and their whole dependency closure, less the
# packages the device has (DEVICE_HAS; torch, pandas, ... are not in the closure) and pulp;
# connection_pool has no wheel on PyPI: built here (pure Python). site/: pyautoattack's source
# without its 42 MB example model. pulp (16 MB, mostly CBC solver binaries) is dropped:
# Snakemake imports it only for its default `--scheduler ilp` (snakemake/scheduling/milp.py), and
# without it falls back to the greedy scheduler with one warning; the rehearsal profile names no
# scheduler and runs one GPU job at a time either way. DEVICE_KIT_PYTHON=3.11 DEVICE_KIT=<dir>
# makes the same kit for this machine's python (how the kit was checked here).
DEVICE_KIT ?= .gpu
DEVICE_KIT_PYTHON ?= 3.12
DEVICE_HAS := pyyaml tabulate attrs
device-kit: $(STAMP)
	rm -rf $(DEVICE_KIT)/whl $(DEVICE_KIT)/site
	mkdir -p $(DEVICE_KIT)/whl $(DEVICE_KIT)/site
	$(BIN)/pip wheel --quiet --no-deps -w $(DEVICE_KIT)/whl connection_pool==0.0.3
	$(BIN)/pip download --quiet --only-binary=:all: --python-version $(DEVICE_KIT_PYTHON) \
		--implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		--platform any --find-links $(DEVICE_KIT)/whl -d $(DEVICE_KIT)/whl snakemake==9.27.1 jsonschema
	rm -f $(foreach p,$(DEVICE_HAS) pulp,$(DEVICE_KIT)/whl/$(p)-*.whl)
	cp -r $(VENV)/lib/python3*/site-packages/pyautoattack $(DEVICE_KIT)/site/
	rm -rf $(DEVICE_KIT)/site/pyautoattack/examples $(DEVICE_KIT)/site/pyautoattack/__pycache__
	@echo "$$(ls $(DEVICE_KIT)/whl | wc -l) wheels in $(DEVICE_KIT)/whl"
	du -sh $(DEVICE_KIT)

# Tests on TEST_WORKERS processes (pytest-xdist; 0: in this one): most run in-process on one
# torch thread, so two workers use both cores; the smoke pipeline's readers share one worker.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadgroup

# tests/test_layers.py: the layering contract (nn < evaluation, data < train < pipeline < bench)
# and the library's imports without the pipeline extra; basedpyright: the types (pyproject.toml).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/snakefmt --check workflow/Snakefile workflow/rules
	$(BIN)/snakemake --lint --cores 1
	$(BIN)/pytest -q tests/test_layers.py
	$(BIN)/basedpyright

# The reference documentation from the docstrings (mkdocs.yml), into site/; any warning fails.
docs: $(STAMP)
	$(BIN)/mkdocs build --strict

clean-smoke:
	rm -rf results/smoke logs/smoke benchmarks/smoke
