"""The pipeline: what the Snakemake rules call, and the only layer that knows their job specs.

Needs the ``pipeline`` extra. Logic lives in the layers below; these modules wire files to it.

* :mod:`~stablenets.pipeline.config`: validation of ``config.yaml`` (one-line errors).
* :mod:`~stablenets.pipeline.checks`: the rules across keys (models against the data, schedules,
  attacks, PnP), each problem one line naming the key, before any job runs.
* :mod:`~stablenets.pipeline.specs`: from the config to each job's JSON spec and target lists.
* :mod:`~stablenets.pipeline.labels`: the noise level as the paths spell it (``sigma0.15``).
* :mod:`~stablenets.pipeline.cli`: ``python -m stablenets <job>``, one entry point per rule.
* :mod:`~stablenets.pipeline.jobs`: the training, evaluation and PnP jobs (files in, files out).
* :mod:`~stablenets.pipeline.resume`: the progress a job saves as it goes (sweep states, image
  groups, TV weight scores, the Lipschitz search's state and bound), which its rerun resumes
  from.
* :mod:`~stablenets.pipeline.runtime`: device choice, provenance, result files.
* :mod:`~stablenets.pipeline.tables`, :mod:`~stablenets.pipeline.figures`,
  :mod:`~stablenets.pipeline.reports`: tables, figures and the summary from result files.
* :mod:`~stablenets.pipeline.outputs`: the registry of tables and figures, each declared once
  where it is built.
* :mod:`~stablenets.bench.cost`: measured cost per job and projected hours (rehearsal).
* :mod:`~stablenets.pipeline.locks`: clearing a stale Snakemake lock safely.
* :mod:`~stablenets.pipeline.snakemake_args`: a Snakemake command line's options, profiles and
  config files, as Snakemake reads them (for the tools run before it).
"""
