"""Evaluation: adversarial robustness, denoising metrics, the TV baseline and Plug-and-Play.

torch and numpy only (AutoAttack is imported inside the one function that runs it).

* :mod:`~stablenets.evaluation.robustness`: certified radii, PGD and the strong attack, and the
  resumable sweep over the radius grid.
* :mod:`~stablenets.evaluation.metrics`: PSNR and fixed-seed noise.
* :mod:`~stablenets.evaluation.tv`: total variation and the TV denoising baseline.
* :mod:`~stablenets.evaluation.pnp`: Plug-and-Play deblurring with a learned denoiser.
"""
