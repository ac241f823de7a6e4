"""Evaluation: adversarial robustness, denoising metrics, the TV baseline and Plug-and-Play.

torch and numpy only (AutoAttack is imported inside the one function that runs it).

* :mod:`~stablenets.evaluation.robustness`: margins, certified radii, L2 PGD, AutoAttack, robust
  accuracy curves and the certified <= empirical <= clean invariant.
* :mod:`~stablenets.evaluation.radius_sweep`: a classifier's evaluation as one resumable sweep over
  the radius grid, each point attacked only where it can change a number.
* :mod:`~stablenets.evaluation.attack_graphs`: an attack's forward and backward passes replayed
  from CUDA graphs, one per batch bucket.
* :mod:`~stablenets.evaluation.metrics`: PSNR and fixed-seed noise.
* :mod:`~stablenets.evaluation.tv`: total variation and the TV denoising baseline.
* :mod:`~stablenets.evaluation.pnp`: Plug-and-Play deblurring with a learned denoiser.
"""
