"""Gaussian diffusion (DDPM, paper Section 2 / Eq. 1-15): schedules, forward noising, losses, posterior,
the 1000-step ancestral sampler and DDIM.

Index convention: t in {0, ..., T-1}; betas[t] is the variance added by step t+1 of the paper's Eq. 2, so
x_t here is the paper's x_{t+1} and alphas_cumprod[t] = prod_{s <= t} (1 - betas[s]). t = 0 is the first,
least noisy step; T - 1 is pure noise (up to the schedule's last alpha-bar).

A "model" is any callable ``eps = model(x_t, t)`` with x_t (B, ...) and t (B,) integer timesteps; the ViT's
``denoise`` method is one.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

SAMPLERS = ("ancestral", "ddim", "dpm-solver++")
EpsModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cosine_betas(T: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal's cosine schedule: alpha-bar(t) = f(t)/f(0), f(t) = cos^2((t/T + s)/(1 + s) * pi/2)."""
    f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    return np.array([min(1 - f((i + 1) / T) / f(i / T), max_beta) for i in range(T)], dtype=np.float64)


def linear_betas(T: int) -> np.ndarray:
    """Ho et al.'s linear schedule from 1e-4 to 0.02 at T = 1000, rescaled for other T."""
    scale = 1000 / T
    return np.linspace(scale * 1e-4, scale * 0.02, T, dtype=np.float64)


def make_betas(schedule: str, T: int) -> np.ndarray:
    if schedule == "cosine":
        return cosine_betas(T)
    if schedule == "linear":
        return linear_betas(T)
    raise ValueError(f"unknown schedule '{schedule}'")


def _gather(a: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """a[t] reshaped to broadcast against x: (B,) -> (B, 1, ..., 1), in x's dtype."""
    return a.to(x.device)[t].to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))


class GaussianDiffusion:
    """Schedule tensors (float64 on the CPU, gathered per batch) and the operations built on them."""

    def __init__(self, timesteps: int = 1000, schedule: str = "cosine", loss: str = "l1", prediction: str = "eps",
                 weighting: str = "none", min_snr_gamma: float = 5.0):
        self.T, self.schedule, self.loss_type = timesteps, schedule, loss
        self.prediction, self.weighting, self.min_snr_gamma = prediction, weighting, min_snr_gamma
        betas = make_betas(schedule, timesteps)
        alphas = 1.0 - betas
        abar = np.cumprod(alphas)
        abar_prev = np.append(1.0, abar[:-1])
        t64 = lambda a: torch.tensor(a, dtype=torch.float64)
        self.betas = t64(betas)
        self.alphas_cumprod = t64(abar)
        self.alphas_cumprod_prev = t64(abar_prev)
        self.sqrt_alphas_cumprod = t64(np.sqrt(abar))
        self.sqrt_one_minus_alphas_cumprod = t64(np.sqrt(1 - abar))
        self.half_logsnr = t64(0.5 * np.log(abar / (1 - abar)))                            # lambda_t (DPM-Solver)
        self.sqrt_recip_alphas_cumprod = t64(np.sqrt(1 / abar))
        self.sqrt_recipm1_alphas_cumprod = t64(np.sqrt(1 / abar - 1))
        # Posterior q(x_{t-1} | x_t, x_0), Eq. 11-13.
        post_var = betas * (1 - abar_prev) / (1 - abar)                                   # beta-tilde, Eq. 13
        self.posterior_variance = t64(post_var)
        self.posterior_log_variance_clipped = t64(np.log(np.append(post_var[1], post_var[1:])))
        self.posterior_mean_coef1 = t64(betas * np.sqrt(abar_prev) / (1 - abar))          # x_0 coef, Eq. 12
        self.posterior_mean_coef2 = t64((1 - abar_prev) * np.sqrt(alphas) / (1 - abar))   # x_t coef, Eq. 12

    @classmethod
    def from_config(cls, cfg) -> "GaussianDiffusion":
        return cls(cfg.timesteps, cfg.schedule, cfg.loss, cfg.prediction, cfg.weighting)

    # -- forward process -------------------------------------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Sample x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I): Eq. 9-10."""
        return _gather(self.sqrt_alphas_cumprod, t, x0) * x0 + _gather(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise

    def predict_x0(self, xt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Invert Eq. 10: x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
        return _gather(self.sqrt_recip_alphas_cumprod, t, xt) * xt - _gather(self.sqrt_recipm1_alphas_cumprod, t, xt) * eps

    def x0_from_output(self, out: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The x0 estimate of a raw network output (eps, or v: x0 = alpha_t x_t - sigma_t v), clamped to [-1, 1]."""
        out = out.to(xt.dtype)
        if self.prediction == "v":
            alpha, sigma = _gather(self.sqrt_alphas_cumprod, t, xt), _gather(self.sqrt_one_minus_alphas_cumprod, t, xt)
            x0 = alpha * xt - sigma * out
        else:
            x0 = self.predict_x0(xt, t, out)
        return x0.clamp(-1, 1)

    def q_posterior(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor):
        """Mean, variance and log-variance of q(x_{t-1} | x_t, x_0): Eq. 11-13."""
        mean = _gather(self.posterior_mean_coef1, t, xt) * x0 + _gather(self.posterior_mean_coef2, t, xt) * xt
        return mean, _gather(self.posterior_variance, t, xt), _gather(self.posterior_log_variance_clipped, t, xt)

    # -- training loss ---------------------------------------------------------------------------------------
    def draw(self, n: int, shape: tuple, generator: torch.Generator | None = None):
        """The random part of n training inputs of `shape` (C, H, W): t ~ U{0..T-1} (n,) and eps ~ N(0, I)
        (n, C, H, W), on the CPU."""
        t = torch.randint(0, self.T, (n,), generator=generator, device="cpu")
        return t, torch.randn((n, *shape), generator=generator, device="cpu")

    def noised(self, x0: torch.Tensor, generator: torch.Generator | None = None):
        """A training input: t ~ U{0..T-1}, eps ~ N(0, I), x_t by Eq. 10. Returns (x_t, t, eps)."""
        t, noise = self.draw(len(x0), tuple(x0.shape[1:]), generator)
        t, noise = t.to(x0.device), noise.to(x0.device, x0.dtype)
        return self.q_sample(x0, t, noise), t, noise

    def loss(self, model: EpsModel, x0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """L_simple (Eq. 15) with t ~ U{0..T-1}; L1 (the paper's code) or L2 (the paper's Eq. 15). `model` is the
        raw network (its output is eps or v, as self.prediction says)."""
        xt, t, noise = self.noised(x0, generator)
        return self.output_loss(model(xt, t), x0, t, noise)

    def output_loss(self, out: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The loss of one network output: against eps (Eq. 15) or v = alpha_t eps - sigma_t x0, unweighted
        (L_simple) or min-SNR-gamma weighted: w_t = min(SNR_t, gamma) / SNR_t for eps, / (SNR_t + 1) for v."""
        out = out.float()
        if self.prediction == "v":
            target = (_gather(self.sqrt_alphas_cumprod, t, x0) * noise
                      - _gather(self.sqrt_one_minus_alphas_cumprod, t, x0) * x0).float()
        else:
            target = noise.float()
        err = (out - target).abs() if self.loss_type == "l1" else (out - target) ** 2
        if self.weighting == "none":                                            # L_simple
            return err.mean()
        per_sample = err.flatten(1).mean(1)                                     # (B,)
        snr = (self.alphas_cumprod / (1 - self.alphas_cumprod)).to(t.device)[t]
        w = snr.clamp(max=self.min_snr_gamma) / (snr + 1 if self.prediction == "v" else snr)
        return (w.float() * per_sample).mean()

    def eps_model(self, net: EpsModel) -> EpsModel:
        """The network as a noise predictor, whatever it was trained to predict (v: eps = sigma_t x_t + alpha_t v)."""
        if self.prediction == "eps":
            return net

        def eps(xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            v = net(xt, t).to(xt.dtype)
            return _gather(self.sqrt_one_minus_alphas_cumprod, t, xt) * xt + _gather(self.sqrt_alphas_cumprod, t, xt) * v
        return eps

    # -- reverse process -------------------------------------------------------------------------------------
    def p_mean_variance(self, model: EpsModel, xt: torch.Tensor, t: torch.Tensor, clip: bool = True):
        """p(x_{t-1} | x_t): mean via the predicted x_0 (clamped to [-1, 1]) in Eq. 12, which equals Eq. 14
        when no clamping happens; variance fixed to beta-tilde (Eq. 13)."""
        eps = model(xt, t).to(xt.dtype)
        x0 = self.predict_x0(xt, t, eps)
        if clip:
            x0 = x0.clamp(-1, 1)
        mean, var, log_var = self.q_posterior(x0, xt, t)
        return mean, var, log_var, x0

    @torch.no_grad()
    def sample_ancestral(self, model: EpsModel, shape, generator: torch.Generator | None = None,
                         device="cpu", clip: bool = True, progress: Callable | None = None) -> torch.Tensor:
        """The T-step ancestral DDPM sampler: x_{T-1} ~ N(0, I), then x_{t-1} ~ p(x_{t-1} | x_t)."""
        x = torch.randn(shape, generator=generator, device="cpu").to(device)
        steps = range(self.T - 1, -1, -1)
        for i in (progress(steps) if progress else steps):
            t = torch.full((shape[0],), i, device=device, dtype=torch.long)
            mean, _, log_var, _ = self.p_mean_variance(model, x, t, clip=clip)
            if i > 0:
                noise = torch.randn(shape, generator=generator, device="cpu").to(device)
                x = mean + torch.exp(0.5 * log_var) * noise
            else:
                x = mean
        return x

    def ddim_timesteps(self, steps: int) -> list[int]:
        """`steps` timesteps evenly spaced from T-1 down to 0 (rounded), distinct."""
        if not 1 <= steps <= self.T:
            raise ValueError(f"DDIM steps must be in [1, {self.T}], got {steps}")
        ts = np.round(np.linspace(self.T - 1, 0, steps)).astype(int)
        return list(dict.fromkeys(ts.tolist()))

    @torch.no_grad()
    def sample_ddim(self, model: EpsModel, shape, steps: int = 50, eta: float = 0.0,
                    generator: torch.Generator | None = None, device="cpu", clip: bool = True,
                    progress: Callable | None = None) -> torch.Tensor:
        """DDIM (Song et al., 2021): x_s = sqrt(abar_s) x0 + sqrt(1 - abar_s - sigma^2) eps + sigma z, with
        sigma = eta * sqrt((1 - abar_s)/(1 - abar_t)) * sqrt(1 - abar_t/abar_s). eta = 1 is ancestral-like."""
        x = torch.randn(shape, generator=generator, device="cpu").to(device)
        ts = self.ddim_timesteps(steps)
        pairs = list(zip(ts, [*ts[1:], -1]))
        for t_now, t_next in (progress(pairs) if progress else pairs):
            t = torch.full((shape[0],), t_now, device=device, dtype=torch.long)
            noise = None
            if eta > 0 and t_next >= 0:
                noise = torch.randn(shape, generator=generator, device="cpu").to(device)
            x = self.ddim_step(x, model(x, t).to(x.dtype), t_now, t_next, eta=eta, clip=clip, noise=noise)
        return x

    def ddim_step(self, x: torch.Tensor, eps: torch.Tensor, t_now: int, t_next: int, eta: float = 0.0,
                  clip: bool = True, noise: torch.Tensor | None = None) -> torch.Tensor:
        """One DDIM update from timestep index t_now to t_next (< 0: to the data, returning the predicted x0)."""
        a_t = float(self.alphas_cumprod[t_now])
        x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        if clip:
            x0 = x0.clamp(-1, 1)
            eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
        if t_next < 0:
            return x0
        a_s = float(self.alphas_cumprod[t_next])
        sigma = eta * math.sqrt((1 - a_s) / (1 - a_t) * (1 - a_t / a_s))
        x = math.sqrt(a_s) * x0 + math.sqrt(max(1 - a_s - sigma ** 2, 0.0)) * eps
        if sigma > 0:
            x = x + sigma * noise
        return x

    def solver_timesteps(self, steps: int, spacing: str = "logsnr") -> list[int]:
        """`steps` distinct timestep indices from T-1 down to 0, evenly spaced in t ("time") or in the half log-SNR
        lambda_t = log(alpha_t / sigma_t) ("logsnr", DPM-Solver's choice), rounded to the nearest trained index.

        logsnr: the last 1 % of the steps hold almost no signal (cosine: alpha < 0.015, and the clipped final beta
        makes lambda jump from -6.5 to -9.9 at t = T-1), where the predicted x0 barely changes; evenly spacing
        lambda over that stretch would spend a third of a 20-step budget there. So: T-1, then even lambda from
        t = 0.99 (T-1) down to 0. On the Gaussian oracle this brings 10-step 2nd order from 0.293 to 0.308 and
        20-step from 0.308 to 0.303 (target 0.299)."""
        if not 1 <= steps <= self.T:
            raise ValueError(f"solver steps must be in [1, {self.T}], got {steps}")
        if spacing == "time":
            return self.ddim_timesteps(steps)
        if spacing != "logsnr":
            raise ValueError(f"unknown spacing '{spacing}'; use logsnr or time")
        if steps == 1:
            return [self.T - 1]
        lam = self.half_logsnr.numpy()                                    # increasing as t decreases
        start = self.T - 1 - max(1, self.T // 100)
        ts = [self.T - 1] + [int(np.abs(lam - v).argmin()) for v in np.linspace(lam[start], lam[0], steps - 1)]
        ts = list(dict.fromkeys(ts))
        for t in range(self.T - 1, -1, -1):                               # fill collisions (many steps, small T)
            if len(ts) >= steps:
                break
            if t not in ts:
                ts.append(t)
        return sorted(ts, reverse=True)

    @torch.no_grad()
    def sample_dpm_solver(self, model: EpsModel, shape, steps: int = 20, order: int = 2, spacing: str = "logsnr",
                          generator: torch.Generator | None = None, device="cpu", clip: bool = True,
                          progress: Callable | None = None) -> torch.Tensor:
        """DPM-Solver++ multistep (Lu et al., 2022), data-prediction form, order 1 (= DDIM), 2 or 3.

        With alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t), lambda_t = log(alpha_t / sigma_t), h = lambda_t -
        lambda_s and D the predicted x0 (clamped to [-1, 1]): x_t = sigma_t/sigma_s x_s - alpha_t (e^{-h} - 1) (D_s
        + corrections from the previous one or two D's). The first steps use lower orders (no history yet); the
        network is evaluated once per timestep, `steps` times in all, and the result is the x0 predicted at t = 0."""
        if order not in (1, 2, 3):
            raise ValueError(f"DPM-Solver++ order must be 1, 2 or 3, got {order}")
        x = torch.randn(shape, generator=generator, device="cpu").to(device)
        ts = self.solver_timesteps(steps, spacing)
        alpha, sigma, lam = self.sqrt_alphas_cumprod, self.sqrt_one_minus_alphas_cumprod, self.half_logsnr
        history: list[tuple[float, torch.Tensor]] = []                    # (lambda, D) of earlier timesteps
        for i in (progress(range(len(ts))) if progress else range(len(ts))):
            t_now = ts[i]
            t = torch.full((shape[0],), t_now, device=device, dtype=torch.long)
            d = self.predict_x0(x, t, model(x, t).to(x.dtype))
            if clip:
                d = d.clamp(-1, 1)
            history = ([*history, (float(lam[t_now]), d)])[-3:]
            if i == len(ts) - 1:
                return d
            t_next = ts[i + 1]
            a_t, s_t, s_s = float(alpha[t_next]), float(sigma[t_next]), float(sigma[t_now])
            h = float(lam[t_next]) - history[-1][0]
            phi = math.expm1(-h)                                           # e^{-h} - 1 (negative)
            k = min(order, len(history))                                   # no history yet: lower order
            if len(ts) < 15:                                               # few steps: the update into the
                k = min(k, len(ts) - i)                                    # last timestep is at most 2nd order
            x = (s_t / s_s) * x - a_t * phi * d
            if k >= 2:
                (l1, d1), (l0, d0) = history[-2], history[-1]
                r0 = (l0 - l1) / h
                D1_0 = (d0 - d1) / r0
                if k == 2:
                    x = x - 0.5 * a_t * phi * D1_0
                else:
                    l2, d2 = history[-3]
                    r1 = (l1 - l2) / h
                    D1_1 = (d1 - d2) / r1
                    D1 = D1_0 + r0 / (r0 + r1) * (D1_0 - D1_1)
                    D2 = (D1_0 - D1_1) / (r0 + r1)
                    x = x + a_t * (phi / h + 1) * D1 - a_t * ((phi / h + 1) / h - 0.5) * D2
        return x

    def sample(self, model: EpsModel, shape, sampler: str = "ddim", steps: int = 50, eta: float = 0.0,
               generator: torch.Generator | None = None, device="cpu", progress: Callable | None = None,
               order: int = 2, spacing: str = "logsnr"):
        if sampler == "ancestral":
            return self.sample_ancestral(model, shape, generator=generator, device=device, progress=progress)
        if sampler == "ddim":
            return self.sample_ddim(model, shape, steps=steps, eta=eta, generator=generator, device=device,
                                    progress=progress)
        if sampler == "dpm-solver++":
            return self.sample_dpm_solver(model, shape, steps=steps, order=order, spacing=spacing,
                                          generator=generator, device=device, progress=progress)
        raise ValueError(f"unknown sampler '{sampler}'; use {', '.join(SAMPLERS)}")
