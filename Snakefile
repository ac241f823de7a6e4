# stablenets: reproduce Sherry et al., "Designing Stable Neural Networks using Convex Analysis
# and ODEs" (Physica D 2024) from dataset download to figures. See README.md.
from snakemake.utils import min_version

min_version("9.0")


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
