"""Benchmarks: speed and memory ratios measured in one run, ours against a plain reference.

* :mod:`~stablenets.bench.training`: training-step timings, peak memory and the projected
  training hours of a config (``python -m stablenets.bench.training``).
* :mod:`~stablenets.bench.evaluation`: the classifier evaluation against a per-radius reference
  (``python -m stablenets.bench.evaluation``).
* :mod:`~stablenets.bench.cost`: the measured cost of each job of a rehearsal and the projected
  hours of the paper's DAG (the ``cost`` rule).
* :mod:`~stablenets.bench.rows`: which benchmark row times a configured variant (the models the
  training benchmark runs, a variant's options), for ``training`` and ``cost``.
* :mod:`~stablenets.bench.reference`: the plain, unoptimised implementation timed against.
"""
