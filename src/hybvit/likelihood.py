"""Negative log-likelihood in bits/dim from DDPM's variational bound (paper Eq. 4-8).

    -log p(x_0) <= L_vlb = L_T + sum_{t=2..T} L_{t-1} + L_0                                   (Eq. 4-5)
    L_T     = KL(q(x_T | x_0) || N(0, I))                                     prior,          Eq. 8
    L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))                   one per step,   Eq. 7
    L_0     = -log p(x_0 | x_1), a discretised Gaussian decoder               256 bins,       Eq. 6

Index convention (see diffusion.py): this code's timestep index t in {0, ..., T-1} is the paper's step t+1.
So index t = 0 is the decoder term L_0 (x_1 = q_sample(x_0, t=0)), index t >= 1 is the paper's L_t (the KL
between the posterior over the code's x_{t-1} and the model's reverse step from x_t), and the prior is taken at
index T-1. The bound is prior + the T terms at indices 0..T-1.

Reverse process: fixed small variance beta-tilde (Eq. 13), the sampler's choice. beta-tilde is 0 at index 0,
so p(x_0 | x_1) uses the log-variance clipped to the index-1 value, as GaussianDiffusion.q_posterior returns
it (Ho et al.'s practice). The model mean is Eq. 12 with x_0 predicted from eps and clamped to [-1, 1], as the
sampler does and as the paper's code computed its Table 4 (clip_denoised=True); clip=False gives the bound of
Eq. 14's unclamped mean instead.

Everything after the model call is computed in float64. Results are per image, in bits per dimension:
nats / (number of dimensions * ln 2). Images are float in [-1, 1] on the 256-level grid (data.to_float).
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch

from .diffusion import EpsModel, GaussianDiffusion

LN2 = math.log(2.0)
BIN_HALF_WIDTH = 1.0 / 255.0  # half of a bin of width 2/255 in [-1, 1] units (1/255 in [0, 1] units)


# ----------------------------------------------------------------------------- elementary pieces

def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def log_normal_cdf_diff(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """log(Phi(hi) - Phi(lo)) for lo < hi (standardised), stable in both tails.

    Written as log Phi(hi) + log(1 - Phi(lo)/Phi(hi)) with log_ndtr; where the whole interval lies in the upper
    tail (lo > 0) the mirrored form log Phi(-lo) + log(1 - Phi(-hi)/Phi(-lo)) is used instead, so neither
    form subtracts two numbers close to 1. lo = -inf and hi = +inf (edge bins) are handled exactly. If the bin
    is so narrow that the two log-CDFs coincide in float64, fall back to log(pdf(centre) * width).
    """
    upper = lo > 0
    a = torch.where(upper, -hi, lo)          # mirrored: Phi(hi) - Phi(lo) = Phi(-lo) - Phi(-hi)
    b = torch.where(upper, -lo, hi)
    log_b = torch.special.log_ndtr(b)
    log_a = torch.special.log_ndtr(a)
    out = log_b + torch.log(-torch.expm1(log_a - log_b))
    centre = torch.where(torch.isfinite(a) & torch.isfinite(b), 0.5 * (a + b), torch.zeros_like(a))
    tiny = -0.5 * centre ** 2 - 0.5 * math.log(2 * math.pi) + torch.log((b - a).clamp_min(1e-300))
    return torch.where(log_a < log_b, out, tiny)


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log P(x) elementwise for x on the 256-level grid of [-1, 1] under N(mean, exp(log_scale)^2) integrated
    over x's bin [x - 1/255, x + 1/255]; the bins of -1 and +1 extend to -inf and +inf (Ho et al., 2020).
    Returns nats (a log-probability, not a density)."""
    x, mean, log_scale = x.double(), mean.double(), log_scale.double()
    inv_scale = torch.exp(-log_scale)
    lo = (x - BIN_HALF_WIDTH - mean) * inv_scale
    hi = (x + BIN_HALF_WIDTH - mean) * inv_scale
    lo = torch.where(x < -0.999, torch.full_like(lo, -math.inf), lo)
    hi = torch.where(x > 0.999, torch.full_like(hi, math.inf), hi)
    return log_normal_cdf_diff(lo, hi)


def _per_image_bits(nats: torch.Tensor) -> torch.Tensor:
    """Elementwise nats (B, ...) -> bits per dimension per image (B,)."""
    return nats.flatten(1).mean(1) / LN2


def _gather64(a: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return a.to(x.device, torch.float64)[t].reshape(-1, *([1] * (x.dim() - 1)))


# ----------------------------------------------------------------------------- the terms of Eq. 5

def prior_bpd(diffusion: GaussianDiffusion, x0: torch.Tensor) -> torch.Tensor:
    """L_T of Eq. 8, KL(q(x_T | x_0) || N(0, I)), per image in bits/dim: (B,). q(x_T | x_0) is Eq. 9 at the
    last index T-1. Near zero for a schedule whose last alpha-bar is ~0 (cosine: abar_{T-1} ~ 1e-9)."""
    x0 = x0.double()
    t = torch.full((x0.shape[0],), diffusion.T - 1, dtype=torch.long, device=x0.device)
    abar = _gather64(diffusion.alphas_cumprod, t, x0)
    mean = abar.sqrt() * x0
    logvar = torch.log1p(-abar).expand_as(x0)
    kl = normal_kl(mean, logvar, torch.zeros_like(mean), torch.zeros_like(logvar))
    return _per_image_bits(kl)


def vlb_terms(diffusion: GaussianDiffusion, model: EpsModel, x0: torch.Tensor, t: torch.Tensor,
              generator: torch.Generator | None = None, clip: bool = True) -> torch.Tensor:
    """One term of Eq. 5 per image, in bits/dim: (B,), for timestep indices t (B,) (any mix of values).

    t >= 1: L_t of Eq. 7, KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) with x_t ~ q(x_t | x_0) (Eq. 10) drawn
            from `generator`; q's mean and variance from Eq. 12-13, p's mean from the model via Eq. 12 with
            predicted x_0 (= Eq. 14), p's variance beta-tilde (Eq. 13). Both variances are equal, so the KL is
            the squared mean difference over 2 beta-tilde; the general Gaussian KL is used anyway.
    t == 0: L_0 of Eq. 6, -log p(x_0 | x_1) with the discretised Gaussian decoder N(mu_theta(x_1), sigma^2)
            integrated over x_0's bin of width 2/255; sigma^2 is beta-tilde clipped to its index-1 value.

    The model sees x_t in x0's dtype (float32 for images, so the ViT runs as in training); everything after
    the model call is float64. Noise is drawn from `generator` on its device (the CPU when it is None) and
    moved to x0's device; a CPU generator makes the numbers the same on every device.
    """
    in_dtype = x0.dtype
    x0 = x0.double()
    t = t.to(x0.device, torch.long)
    gen_device = generator.device if generator is not None else "cpu"
    noise = torch.randn(x0.shape, generator=generator, device=gen_device, dtype=torch.float64).to(x0.device)
    xt = diffusion.q_sample(x0, t, noise)                                   # Eq. 10, float64

    def eps_model(x: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
        return model(x.to(in_dtype), tt).double()

    p_mean, _, p_logvar, _ = diffusion.p_mean_variance(eps_model, xt, t, clip=clip)   # see the module docstring

    out = torch.empty(x0.shape[0], dtype=torch.float64, device=x0.device)
    dec, kl = t == 0, t > 0
    if kl.any():                                                            # Eq. 7, rows with t >= 1
        q_mean, _, q_logvar = diffusion.q_posterior(x0[kl], xt[kl], t[kl])  # q_logvar is exact for t >= 1
        out[kl] = _per_image_bits(normal_kl(q_mean, q_logvar, p_mean[kl], p_logvar[kl]))
    if dec.any():                                                           # Eq. 6, rows with t == 0
        # at index 0 the posterior-mean coefficient of x_t is 0, so p_mean is the predicted x_0
        out[dec] = _per_image_bits(-discretized_gaussian_log_likelihood(x0[dec], p_mean[dec], 0.5 * p_logvar[dec]))
    return out


# ----------------------------------------------------------------------------- the whole bound

def bits_per_dim(diffusion: GaussianDiffusion, model: EpsModel, x0: torch.Tensor,
                 generator: torch.Generator | None = None, timesteps: int | None = None,
                 steps_per_call: int = 1, progress: Callable[[Iterable], Iterable] | None = None,
                 clip: bool = True) -> dict:
    """The variational bound L_vlb of Eq. 5 per image, in bits/dim.

    timesteps=None: the full bound, prior (Eq. 8) + all T terms (Eq. 6-7), each term with its own x_t draw.
    timesteps=K:    an unbiased estimate: per image K indices drawn independently and uniformly from {0..T-1}
                    (with replacement), total = prior + (T/K) * sum of the K sampled terms (each with its own
                    x_t draw). Its expectation over the draws is the full bound. The decoder term only enters
                    when index 0 is drawn (then weighted T/K), as do the large first KL terms, so this
                    estimator is heavy-tailed for small K: trust its standard error only over many images.

    steps_per_call: how many timesteps (columns) share one model call, i.e. calls take B * steps_per_call rows;
    raise it for small B on a GPU. progress: an optional iterable wrapper (e.g. tqdm) over the calls.

    Returns {"total", "prior", "decoder", "kl_sum"}: (B,) float64 tensors (total = prior + decoder + kl_sum;
    under timesteps=K the decoder and kl_sum entries are their weighted estimates), plus "estimator" (a
    description), "timesteps" (the number of terms evaluated per image) and "weight" (T/K, or 1).
    """
    T = diffusion.T
    B = x0.shape[0]
    device = x0.device
    if timesteps is None:
        K, weight = T, 1.0
        columns = torch.arange(T, device=device).expand(B, T)               # (B, T): every index for every image
        estimator = f"full bound over all {T} steps"
    else:
        K = int(timesteps)
        if not 1 <= K <= T:
            raise ValueError(f"timesteps must be in [1, {T}] (or None for the full bound), got {timesteps}")
        weight = T / K
        # K independent uniform indices per image (with replacement: each draw alone is unbiased for the sum
        # of the T terms divided by T, and drawing is O(B K), where K distinct indices would cost O(B T))
        gen_device = generator.device if generator is not None else "cpu"
        columns = torch.randint(0, T, (B, K), generator=generator, device=gen_device).to(device)
        estimator = f"unbiased estimate, {K} random timesteps per image (weight T/K = {weight:g})"

    prior = prior_bpd(diffusion, x0)
    decoder = torch.zeros(B, dtype=torch.float64, device=device)
    kl_sum = torch.zeros(B, dtype=torch.float64, device=device)
    steps_per_call = max(1, int(steps_per_call))
    chunks = range(0, K, steps_per_call)
    for start in (progress(chunks) if progress else chunks):
        cols = columns[:, start:start + steps_per_call]                    # (B, c)
        c = cols.shape[1]
        t = cols.t().reshape(-1)                                            # (c * B,), column-major
        xs = x0.repeat(c, *([1] * (x0.dim() - 1)))                          # image b repeated at rows b, B + b, ...
        terms = vlb_terms(diffusion, model, xs, t, generator, clip).reshape(c, B)
        is_dec = (cols.t() == 0)
        decoder += torch.where(is_dec, terms, torch.zeros_like(terms)).sum(0)
        kl_sum += torch.where(is_dec, torch.zeros_like(terms), terms).sum(0)
    decoder, kl_sum = weight * decoder, weight * kl_sum
    return {"total": prior + decoder + kl_sum, "prior": prior, "decoder": decoder, "kl_sum": kl_sum,
            "estimator": estimator, "timesteps": K, "weight": weight}


__all__ = ["bits_per_dim", "vlb_terms", "prior_bpd", "discretized_gaussian_log_likelihood", "normal_kl",
           "log_normal_cdf_diff"]
