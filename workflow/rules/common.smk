# Configuration, paths and job specifications shared by every rule file.
import json
import os
import sys

from stablenets.pipeline.config import ConfigError, validate_config
from stablenets.pipeline.labels import SIGMA_LABEL
from stablenets.pipeline import outputs
from stablenets.pipeline.specs import Jobs

CONFIG_SCHEMA = str(workflow.source_path("../schemas/config.schema.yaml"))
try:
    config.update(validate_config(config, CONFIG_SCHEMA, LAYERS))
except ConfigError as err:  # its lines, without Snakemake's traceback
    sys.exit(str(err))
JOBS = Jobs(config)
# The tables and figures, from their registry (reading it imports pandas and matplotlib, which the
# jobs' entry point does not: it imports specs, not the registry).
TABLES, FIGURES = outputs.names("table"), outputs.names("figure")


envvars:
    "PATH",


# Jobs run `python` from the environment that runs Snakemake (a venv need not be activated).
os.environ["PATH"] = os.pathsep.join(
    [os.path.dirname(sys.executable), os.environ["PATH"]]
)
SCALE = config["scale"]


wildcard_constraints:
    dataset="cifar10|bsds500",
    variant="[A-Za-z0-9_]+",
    seed="[0-9]+",
    sigma=SIGMA_LABEL,


def R(path):
    """A results path of the current scale."""
    return f"results/{SCALE}/{path}"


def L(path):
    """A log path of the current scale."""
    return f"logs/{SCALE}/{path}"


def B(path):
    """A benchmark path of the current scale."""
    return f"benchmarks/{SCALE}/{path}"


def final_outputs():
    return JOBS.final_outputs(R)


def cost_paper_config(wildcards) -> str:
    """`cost.paper_config`, read when the DAG has the cost job in it (not first by the last job
    of a rehearsal): one not a whole configuration stops Snakemake before any job, one line.
    """
    from stablenets.bench.cost import read_paper_config

    path = config["cost"]["paper_config"]
    try:
        read_paper_config(path, Path(CONFIG_SCHEMA))
    except ValueError as err:
        sys.exit(f"config: {err}")
    return path
