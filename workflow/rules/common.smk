# Configuration, paths and job specifications shared by every rule file.
import json
import os
import sys

from stablenets.pipeline.config import ConfigError, validate_config
from stablenets.pipeline.labels import SIGMA_LABEL
from stablenets.pipeline import outputs
from stablenets.pipeline.specs import Jobs

try:
    config.update(
        validate_config(
            config, workflow.source_path("../schemas/config.schema.yaml"), LAYERS
        )
    )
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
