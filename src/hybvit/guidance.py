"""Self-guided class-conditional sampling: the HybViT's own classifier head steers its own diffusion.

Classifier guidance (Dhariwal & Nichol, 2021) shifts the predicted noise by the gradient of log p(y | x_t):
eps' = eps - s * sigma_t * grad_{x_t} log p(y | x_t). A HybViT has no classifier for noisy images, but it has one
for clean images, and every denoising step predicts a clean image x0_hat = (x_t - sigma_t eps) / alpha_t. So we
use log p(y | x0_hat) with eps held fixed (no backward pass through the denoiser; one through the classifier):
grad_{x_t} log p(y | x0_hat) = grad_{x0_hat} log p(y | x0_hat) / alpha_t. No second model is involved.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .diffusion import GaussianDiffusion, _gather


def self_guided_eps(classify: Callable[[torch.Tensor], torch.Tensor], eps_model: Callable, diffusion: GaussianDiffusion,
                    label: int, scale: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """An eps-model that steers toward class `label` with guidance scale `scale` (0 = unguided)."""
    if scale == 0:
        return eps_model

    def eps(xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            e = eps_model(xt, t).to(xt.dtype)
        a = _gather(diffusion.sqrt_alphas_cumprod, t, xt)
        b = _gather(diffusion.sqrt_one_minus_alphas_cumprod, t, xt)
        x0 = ((xt - b * e) / a).clamp(-1, 1).detach().requires_grad_(True)    # (B, C, H, W)
        with torch.enable_grad():
            logp = F.log_softmax(classify(x0).float(), dim=1)[:, label].sum()
            grad = torch.autograd.grad(logp, x0)[0]                           # d log p(y | x0_hat) / d x0_hat
        return e - scale * (b / a) * grad.to(xt.dtype)                         # eps - s sigma_t grad_{x_t}
    return eps
