"""Test-set negative log-likelihood in bits/dim from the variational bound (paper Eq. 4-8, Table 4).

The paper reports the full bound over all T = 1000 steps (prior KL + 999 KLs + the discretised decoder at the
first step, fixed small variance). That costs T model calls per image; `timesteps=K` gives an unbiased
estimate from K random timesteps per image instead (see hybvit.likelihood.bits_per_dim), labelled as such.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from tqdm.auto import tqdm

from .. import distributed
from ..data import to_float
from ..errors import HybvitError
from ..likelihood import bits_per_dim
from ..sample import eps_function


@torch.no_grad()
def evaluate_bpd(run, x_test_uint8: torch.Tensor, num_images: int | None = None, timesteps: int | None = None,
                 batch_size: int = 500, seed: int = 0, progress: bool = False) -> dict[str, Any]:
    """Bits/dim of the first `num_images` test images (uint8 (N, C, H, W); None = all of them, the paper's
    protocol) under the run's model.

    timesteps=None: the full bound over all T steps; timesteps=K: the unbiased K-step estimate.
    batch_size: rows per model call. Images are taken in batches of up to batch_size, and when a batch has
    fewer images than batch_size, several timesteps share one call (batch_size // images per call).
    The batch of images from `start` draws its noise (and timesteps) from a generator seeded with seed + start, so
    the same seed, data, num_images and batch_size give the same numbers, on one process or split over several. The model runs under the run's autocast setting; the
    bound is computed in float64 from its eps predictions, with the predicted x_0 clamped to [-1, 1] as the
    paper's code (clip_denoised=True).

    Returns plain floats: bits_per_dim (mean over images), std_error (of that mean over images; None for a
    single image), num_images, estimator, timesteps (terms evaluated per image) and terms (mean prior,
    decoder and kl_sum; bits_per_dim = their sum).
    """
    num_images = len(x_test_uint8) if num_images is None else num_images
    if num_images < 1:
        raise HybvitError(f"bpd needs at least one test image, got num_images={num_images}")
    if len(x_test_uint8) == 0:
        raise HybvitError("bpd: the test set is empty")
    if x_test_uint8.dtype != torch.uint8:
        raise HybvitError(f"bpd expects uint8 test images (0..255), got {x_test_uint8.dtype}")
    if batch_size < 1:
        raise HybvitError(f"batch size must be positive, got {batch_size}")
    T = run.diffusion.T
    if timesteps is not None and not 1 <= timesteps <= T:
        raise HybvitError(f"bpd timesteps must be in [1, {T}] (or omitted for the full bound), got {timesteps}")
    n = min(num_images, len(x_test_uint8))
    x = x_test_uint8[:n]
    model, device = run.model, run.device
    # the bound needs eps (v-prediction runs are converted)
    eps_model = eps_function(model, run.diffusion, run.config.train.amp, device)

    was_training = model.training
    model.eval()
    per_call = batch_size
    img_batch = min(per_call, n)
    K = T if timesteps is None else timesteps
    steps_per_call = max(1, min(K, per_call // img_batch))
    names = ("total", "prior", "decoder", "kl_sum")

    def one(start: int, stop: int) -> tuple[str, dict[str, torch.Tensor]]:
        x0 = to_float(x[start:stop].to(device))
        bar = None
        if progress:
            bar = lambda it: tqdm(it, desc=f"bits/dim {stop}/{n}", leave=False, mininterval=1.0)
        g = torch.Generator().manual_seed(seed + start)          # each batch its own draws: splittable
        r = bits_per_dim(run.diffusion, eps_model, x0, g, timesteps=timesteps, steps_per_call=steps_per_call,
                         progress=bar)
        return r["estimator"], {k: r[k].cpu() for k in names}
    try:
        parts = distributed.map_batches(n, img_batch, one)     # split over the ranks inside shared_work
    finally:
        model.train(was_training)
    estimator = parts[0][0]
    v = {k: torch.cat([p[1][k] for p in parts]) for k in names}
    total = v["total"]
    std_error = float(total.std(unbiased=True) / math.sqrt(n)) if n > 1 else None
    return {"bits_per_dim": float(total.mean()), "std_error": std_error, "num_images": n,
            "protocol": f"paper: predicted x_0 clamped to [-1, 1] (clip_denoised=True), {n} of the "
                        f"{len(x_test_uint8)} test images", "estimator": estimator, "timesteps": K,
            "terms": {k: float(v[k].mean()) for k in ("prior", "decoder", "kl_sum")}}


__all__ = ["evaluate_bpd"]
