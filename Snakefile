# stablenets: reproduce Sherry et al., "Designing Stable Neural Networks using Convex Analysis
# and ODEs" (Physica D 2024) from dataset download to figures. See README.md.
from snakemake.utils import min_version

min_version("9.0")

import sys

from stablenets.pipeline.config import ConfigError, read_layers, snakemake_files

# The config files (the workflow's, then each --configfile) and --config, as given: read here
# first, a YAML error or a key given twice stops Snakemake in one line naming the file; later
# errors name the file that set their key.
try:
    LAYERS = read_layers(
        snakemake_files(
            "config.yaml",
            workflow.overwrite_configfiles,
            workflow.config_settings.replace_workflow_config,
        ),
        workflow.config_settings.config,
    )
except ConfigError as err:
    sys.exit(str(err))


configfile: "config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/classification.smk"
include: "workflow/rules/denoising.smk"
include: "workflow/rules/pnp.smk"
include: "workflow/rules/figures.smk"
include: "workflow/rules/cost.smk"


rule all:
    default_target: True
    input:
        final_outputs(),
