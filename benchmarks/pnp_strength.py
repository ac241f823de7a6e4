"""PnP at each denoiser strength against TV at its best weight, in one run (session 29).

    .venv/bin/python benchmarks/pnp_strength.py                  # 3 photos of 64x80, 300 its
    .venv/bin/python benchmarks/pnp_strength.py --size 96 128 --denoiser-weight 0.3

Why ``pnp.strengths`` exists: PnP has no weight of its own, and a denoiser trained at a noise
level far above the problem's (the config's sigma 0.15 against noise 0.01) plugs in a regulariser
far stronger than the problem needs. The stand-in denoiser here is one whose regulariser is
known, TV's proximal map at ``--denoiser-weight`` (0.08: about the best TV-denoising weight at
sigma 0.15 on these photos). PnP forward-backward (eta 1) runs at every strength
``D_beta = (1 - beta) I + beta D`` on scikit-image's astronaut, coffee and chelsea resized to
``--size``, blurred as the paper's problem (9x9, sigma 1.6) with noise 0.01; TV deblurring runs at
the best of the config's weights on the same images. Printed: mean PSNR (peak 1) of each, the
observation's, how many images each strength's run stopped at ``tol``, and the strength the job's
rule would pick (the best among those that converged on every image). One thread.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import skimage.data
import torch
from skimage.transform import resize

from stablenets.evaluation import pnp
from stablenets.evaluation.metrics import psnr
from stablenets.evaluation.tv import tv_denoise

PHOTOS = ("astronaut", "coffee", "chelsea")


def photos(height: int, width: int) -> torch.Tensor:
    """The three photographs, ``(3, 3, height, width)`` in [0, 1]."""
    images = [resize(getattr(skimage.data, n)(), (height, width), anti_aliasing=True)
              for n in PHOTOS]  # fmt: skip
    return torch.tensor(np.stack(images).transpose(0, 3, 1, 2), dtype=torch.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs=2, default=[64, 80])
    parser.add_argument("--denoiser-weight", type=float, default=0.08)
    parser.add_argument("--strengths", type=float, nargs="+",
                        default=[1.0, 0.3, 0.1, 0.03, 0.01, 0.003])  # fmt: skip
    parser.add_argument("--tv-weights", type=float, nargs="+",
                        default=[0.00025, 0.0005, 0.001, 0.002, 0.004, 0.008])  # fmt: skip
    parser.add_argument("--iters", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)
    clean = photos(*args.size)
    blur = pnp.GaussianBlur(9, 1.6, clean.shape[1:])
    observed = pnp.observe(clean, blur, 0.01, seed=7)
    print(f"observed: {float(psnr(observed, clean, 1.0).mean()):.2f} dB")

    def denoiser(v: torch.Tensor) -> torch.Tensor:
        return tv_denoise(v, args.denoiser_weight, 200, tol=1e-4).x

    converged = {}
    for strength in args.strengths:
        start = time.monotonic()
        x, history = pnp.pnp_forward_backward(
            pnp.relaxed_denoiser(denoiser, strength), blur, observed, 1.0, max_iter=args.iters
        )
        score = float(psnr(x, clean, 1.0).mean())
        if history["converged"].all():
            converged[strength] = score
        print(f"PnP strength {strength:g}: {score:.2f} dB, "
              f"{int(history['converged'].sum())} of {len(x)} stopped at tol, "
              f"{time.monotonic() - start:.0f} s")  # fmt: skip
    if converged:  # the job's rule (pnp.select_pnp_strength), here on the images themselves
        best = max(converged, key=converged.__getitem__)
        print(
            f"the best strength that converged on every image: {best:g}, {converged[best]:.2f} dB"
        )
    scores = {
        w: float(psnr(pnp.tv_deblur(observed, blur, w, args.iters)[0], clean, 1.0).mean())
        for w in args.tv_weights
    }
    best = max(scores, key=scores.__getitem__)
    print(f"TV deblurring at its best weight {best:g}: {scores[best]:.2f} dB")


if __name__ == "__main__":
    main()
