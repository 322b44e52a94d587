"""The variational bound (paper Eq. 4-8) against a Gaussian oracle whose bound is known in closed form.

Data: per pixel x0 ~ N(MU, S^2), quantised to the 256-level grid of [-1, 1] (uint8, then to float), so the
two edge levels collect the tails. Model: the exact noise predictor for the continuous Gaussian,
E[eps | x_t] = b / (a^2 s^2 + b^2) (x_t - a mu) with a = sqrt(abar_t), b = sqrt(1 - abar_t), as in
test_diffusion.py. Everything in the reverse process is then linear-Gaussian given x0, so every KL term of
Eq. 7 has a closed-form expectation needing only the mean and variance of the quantised x0; the decoder
(Eq. 6) is integrated numerically per level. That reference is written here in numpy/scipy from the betas
alone; it shares no code with hybvit.likelihood.
"""
import math

import numpy as np
import pytest
import torch
from scipy.special import ndtr

from hybvit.data import to_float, to_uint8
from hybvit.diffusion import GaussianDiffusion, cosine_betas
from hybvit.likelihood import bits_per_dim, discretized_gaussian_log_likelihood, prior_bpd, vlb_terms

MU, S = 0.2, 0.3
T = 1000
# x0 as (images, pixels): many pixels per "image" keep the per-timestep gathers cheap; pixels are i.i.d., so
# the standard error over images is still honest. 1500 x 100 pixels give a standard error of ~0.006 bits/dim.
N_IMAGES, PIXELS = 1500, 100


def oracle(d, s=S, mu=MU):
    def eps(xt, t):
        a = d.sqrt_alphas_cumprod[t].to(xt.dtype).reshape(-1, *([1] * (xt.dim() - 1)))
        b = d.sqrt_one_minus_alphas_cumprod[t].to(xt.dtype).reshape(-1, *([1] * (xt.dim() - 1)))
        return b / (a ** 2 * s ** 2 + b ** 2) * (xt - a * mu)
    return eps


def quantised_gaussian_data(n, pixels, seed):
    g = torch.Generator().manual_seed(seed)
    return to_float(to_uint8(MU + S * torch.randn(n, pixels, generator=g))).double()


# ------------------------------------------------------------------ the closed-form reference (numpy/scipy)

def level_probabilities():
    """P(level k), k = 0..255, of N(MU, S^2) rounded to the grid k/127.5 - 1 and clamped to [-1, 1]."""
    k = np.arange(256)
    lv = k / 127.5 - 1
    lo = np.where(k == 0, -np.inf, lv - 1 / 255)
    hi = np.where(k == 255, np.inf, lv + 1 / 255)
    return lv, lo, hi, ndtr((hi - MU) / S) - ndtr((lo - MU) / S)


def exact_nll_bits():
    """Entropy of the 256-level distribution: the exact NLL of the data, in bits/dim."""
    p = level_probabilities()[3]
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def closed_form_bound(s_model=S):
    """E[L_vlb] in bits/dim for the oracle built for N(MU, s_model^2), on the quantised N(MU, S^2) data.

    Paper indexing (steps 1..T) with arrays indexed from 0: beta[j] is beta_{j+1}.
    x_t = a x0 + b eps; the model's mean is Eq. 14, mu_theta = (x_t - beta_t / b * eps_hat(x_t)) / sqrt(alpha_t),
    the posterior mean Eq. 12, mu_tilde = c1 x0 + c2 x_t. mu_tilde - mu_theta = A x0 + B eps + C with eps
    independent of x0, so E[(mu_tilde - mu_theta)^2] = A^2 E[x0^2] + 2 A C E[x0] + C^2 + B^2, and with equal
    variances beta-tilde the KL of Eq. 7 is that over 2 beta-tilde.
    """
    lv, lo, hi, p = level_probabilities()
    m = float((p * lv).sum())
    ex2 = float((p * lv ** 2).sum())
    beta = cosine_betas(T)
    alpha = 1 - beta
    abar = np.cumprod(alpha)
    abar_prev = np.append(1.0, abar[:-1])
    eps_coef = lambda a, b: b / (a ** 2 * s_model ** 2 + b ** 2)          # eps_hat = k (x_t - a MU)

    # L_T, Eq. 8: KL(N(sqrt(abar_T) x0, 1 - abar_T) || N(0, 1)), averaged over x0
    var_T = 1 - abar[-1]
    prior = 0.5 * (-1 - np.log(var_T) + var_T + abar[-1] * ex2)

    # L_{t-1}, Eq. 7, paper steps t = 2..T (array index j = t - 1 = 1..T-1)
    j = np.arange(1, T)
    a, b = np.sqrt(abar[j]), np.sqrt(1 - abar[j])
    k = eps_coef(a, b)
    c1 = np.sqrt(abar_prev[j]) * beta[j] / (1 - abar[j])
    c2 = np.sqrt(alpha[j]) * (1 - abar_prev[j]) / (1 - abar[j])
    g = (1 - beta[j] / b * k) / np.sqrt(alpha[j])                          # mu_theta = g x_t + h
    h = beta[j] / b * k * a * MU / np.sqrt(alpha[j])
    A, B, C = c1 + (c2 - g) * a, (c2 - g) * b, -h
    beta_tilde = (1 - abar_prev[j]) / (1 - abar[j]) * beta[j]              # Eq. 13
    kl = (A ** 2 * ex2 + 2 * A * C * m + C ** 2 + B ** 2) / (2 * beta_tilde)

    # L_0, Eq. 6: decoder N(mu_theta(x_1), sigma^2) with sigma^2 = beta-tilde of step 2 (step 1's is 0),
    # integrated over x_1 | x0 = level by Gauss-Hermite quadrature and weighted by the level probabilities
    a1, b1 = np.sqrt(abar[0]), np.sqrt(1 - abar[0])
    k1 = eps_coef(a1, b1)
    sigma = np.sqrt((1 - abar[0]) / (1 - abar[1]) * beta[1])
    z, w = np.polynomial.hermite_e.hermegauss(80)
    w = w / w.sum()
    x1 = a1 * lv[:, None] + b1 * z[None, :]                                 # (levels, nodes)
    mean = (x1 - beta[0] / b1 * k1 * (x1 - a1 * MU)) / np.sqrt(alpha[0])
    zl, zh = (lo[:, None] - mean) / sigma, (hi[:, None] - mean) / sigma
    mass = np.where(zl > 0, ndtr(-zl) - ndtr(-zh), ndtr(zh) - ndtr(zl))    # upper-tail bins: mirrored
    decoder = float((p * -(np.log(mass) * w).sum(1)).sum())

    bits = lambda nats: nats / math.log(2)
    return {"total": bits(prior + kl.sum() + decoder), "prior": bits(prior), "decoder": bits(decoder),
            "kl_sum": bits(kl.sum()), "terms": bits(np.append(decoder, kl))}  # terms[i]: this code's index i


# ------------------------------------------------------------------ tests

@pytest.fixture(scope="module")
def diffusion():
    return GaussianDiffusion(T, "cosine")


@pytest.fixture(scope="module")
def full_bound(diffusion):
    x0 = quantised_gaussian_data(N_IMAGES, PIXELS, seed=0)
    r = bits_per_dim(diffusion, oracle(diffusion), x0, torch.Generator().manual_seed(1), steps_per_call=10)
    return x0, r


def mean_and_se(v):
    return v.mean().item(), v.std().item() / math.sqrt(len(v))


def test_reference_numbers():
    """The closed form against REFERENCE-NOTES' independent numbers (~7.96 bound, ~7.30 NLL; both a little
    lower here because the top edge level collects the 0.4 % tail above 1, which the notes' rounding ignores)."""
    ref = closed_form_bound()
    assert ref["total"] == pytest.approx(7.96, abs=0.03)
    assert exact_nll_bits() == pytest.approx(7.30, abs=0.03)
    assert ref["prior"] < 1e-6


def test_full_bound_matches_closed_form(full_bound):
    x0, r = full_bound
    ref = closed_form_bound()
    total, se = mean_and_se(r["total"])
    assert r["estimator"].startswith("full bound") and r["timesteps"] == T
    assert se < 0.008                                                      # the check below has power
    assert abs(total - ref["total"]) < 0.02, (total, se, ref)
    torch.testing.assert_close(r["total"], r["prior"] + r["decoder"] + r["kl_sum"])
    # the breakdown too (each within 4 standard errors; the prior is deterministic)
    assert r["prior"].mean().item() == pytest.approx(ref["prior"], abs=1e-9)
    for key in ("decoder", "kl_sum"):
        mean, se_k = mean_and_se(r[key])
        assert abs(mean - ref[key]) < 4 * se_k, (key, mean, se_k, ref[key])


def test_bound_is_above_exact_nll(full_bound):
    _, r = full_bound
    total, se = mean_and_se(r["total"])
    nll = exact_nll_bits()
    assert total - 10 * se > nll                       # cross-entropy >= entropy; here by ~0.66 bits/dim
    assert 0.4 < total - nll < 1.0


def test_subset_estimate_is_unbiased(diffusion, full_bound):
    """K = 50 random timesteps per image, weight T/K: averages to the full bound. The timesteps are drawn per
    image, so the same pixels as single-pixel images (150,000 of them) are used to average over many draws."""
    x0, r = full_bound
    full, se_full = mean_and_se(r["total"])
    est = bits_per_dim(diffusion, oracle(diffusion), x0.reshape(-1, 1), torch.Generator().manual_seed(2),
                       timesteps=50, steps_per_call=10)
    assert est["estimator"].startswith("unbiased estimate") and est["timesteps"] == 50 and est["weight"] == 20
    mean, se = mean_and_se(est["total"])
    assert se < 0.05
    assert abs(mean - full) < 3 * math.hypot(se, se_full), (mean, se, full)
    assert abs(mean - closed_form_bound()["total"]) < 3 * se
    torch.testing.assert_close(est["total"], est["prior"] + est["decoder"] + est["kl_sum"])
    # the decoder enters an image's estimate only when index 0 is among its 50 independent uniform draws
    drawn = (est["decoder"] > 0).double().mean().item()
    assert drawn == pytest.approx(1 - (1 - 1 / T) ** 50, abs=0.004)


def test_wrong_predictor_gives_a_higher_bound(diffusion):
    x0 = quantised_gaussian_data(200, PIXELS, seed=3)
    right = bits_per_dim(diffusion, oracle(diffusion), x0, torch.Generator().manual_seed(4), steps_per_call=10)
    wrong = bits_per_dim(diffusion, oracle(diffusion, s=0.5), x0, torch.Generator().manual_seed(4),
                         steps_per_call=10)
    gap = wrong["total"].mean().item() - right["total"].mean().item()
    expected = closed_form_bound(0.5)["total"] - closed_form_bound()["total"]   # ~0.28 bits/dim
    assert expected > 0.2
    assert gap == pytest.approx(expected, abs=0.08)


def test_decoder_edges_and_tails():
    """The discretised decoder: edge bins reach +-infinity, probabilities sum to one over the 256 levels and
    stay finite far in the tails."""
    levels = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    for mean, log_scale in ((0.3, math.log(0.05)), (-0.99, math.log(0.003)), (1.7, math.log(0.01))):
        lp = discretized_gaussian_log_likelihood(levels, torch.full_like(levels, mean),
                                                 torch.full_like(levels, log_scale))
        assert torch.isfinite(lp).all() and (lp <= 0).all()
        assert lp.exp().sum().item() == pytest.approx(1.0, abs=1e-9)
    # a mean far beyond +1: the top level holds essentially all the mass
    lp = discretized_gaussian_log_likelihood(levels[-1:], torch.tensor([1.7], dtype=torch.float64),
                                             torch.tensor([math.log(0.01)], dtype=torch.float64))
    assert lp.item() == pytest.approx(0.0, abs=1e-12)


def test_vlb_terms_per_timestep(diffusion):
    """vlb_terms gives each row the term of its own timestep (decoder at index 0, the KL of Eq. 7 otherwise),
    each matching its closed-form expectation; 20,000 pixels per row make every row nearly deterministic."""
    x0 = quantised_gaussian_data(5, 20_000, seed=5)
    t = torch.tensor([0, 1, 7, 500, 999])
    got = vlb_terms(diffusion, oracle(diffusion), x0, t, torch.Generator().manual_seed(6))
    expected = closed_form_bound()["terms"][t.numpy()]
    np.testing.assert_allclose(got.numpy(), expected, rtol=0.05)
    assert expected[0] > 1.5 and expected[1] > 0.5 and expected[4] < 1e-5   # decoder ~1.8, KLs shrink with t
    assert prior_bpd(diffusion, x0).abs().max() < 1e-6


@pytest.mark.parametrize("clip", [False, True])
def test_terms_for_a_model_predicting_a_fixed_x0(diffusion, clip):
    """A model whose predicted x_0 is the constant 1.02, outside [-1, 1]: the paper's protocol (clip=True, its
    clip_denoised) clamps it to c = 1, clip=False keeps c = 1.02. Then p's mean is Eq. 12 with x_0 := c, so
    L_t = (coef1_t (x0 - c))^2 / (2 beta-tilde_t) exactly, and the decoder is -log of the N(c, beta-tilde_2) mass
    of x0's bin (scipy)."""
    predicted = 1.02
    c = 1.0 if clip else predicted
    def fixed(xt, t):                           # eps such that (x_t - b eps) / a = c
        a = diffusion.sqrt_alphas_cumprod[t].to(xt.dtype).reshape(-1, 1)
        b = diffusion.sqrt_one_minus_alphas_cumprod[t].to(xt.dtype).reshape(-1, 1)
        return (xt - a * predicted) / b
    x0 = torch.tensor([[250, 252, 254, 255]], dtype=torch.float64) / 127.5 - 1  # near c: scipy cannot underflow
    beta = cosine_betas(T)
    abar = np.cumprod(1 - beta)
    x = x0.numpy()[0]
    sigma = math.sqrt(beta[1] * (1 - abar[0]) / (1 - abar[1]))
    lo = np.where(x < -0.999, -np.inf, x - 1 / 255)
    hi = np.where(x > 0.999, np.inf, x + 1 / 255)
    mass = np.where((lo - c) / sigma > 0, ndtr((c - lo) / sigma) - ndtr((c - hi) / sigma),
                    ndtr((hi - c) / sigma) - ndtr((lo - c) / sigma))
    expected = {0: np.mean(-np.log(mass)) / math.log(2)}
    for j in (1, 300, 990):
        coef1 = math.sqrt(abar[j - 1]) * beta[j] / (1 - abar[j])
        beta_tilde = (1 - abar[j - 1]) / (1 - abar[j]) * beta[j]
        expected[j] = np.mean((coef1 * (x - c)) ** 2 / (2 * beta_tilde)) / math.log(2)
    g = torch.Generator().manual_seed(8)
    for j, value in expected.items():
        got = vlb_terms(diffusion, fixed, x0, torch.tensor([j]), g, clip=clip).item()
        assert got == pytest.approx(value, rel=1e-6), j


def test_prior_kl_closed_form():
    """L_T (Eq. 8) with a last alpha-bar of 0.5 (the real schedules leave ~0 there):
    KL(N(sqrt(0.5) x, 0.5) || N(0, 1)) = 0.5 (-1 - ln 0.5 + 0.5 + 0.5 x^2) nats per pixel."""
    d = GaussianDiffusion(10, "cosine")
    d.alphas_cumprod = d.alphas_cumprod.clone()
    d.alphas_cumprod[-1] = 0.5
    x0 = torch.tensor([[0.6, -0.2, 1.0], [0.0, 0.0, 0.0]])
    kl = 0.5 * (-1 - math.log(0.5) + 0.5 + 0.5 * x0.double() ** 2)
    torch.testing.assert_close(prior_bpd(d, x0), kl.mean(1) / math.log(2))


def test_evaluate_bpd_on_a_tiny_vit():
    from hybvit.config import preset_config
    from hybvit.datasets import load_data
    from hybvit.evaluate.bpd import evaluate_bpd
    from hybvit.model import ViT
    from hybvit.errors import HybvitError
    from hybvit.sample import Run

    torch.manual_seed(0)
    cfg = preset_config("digits-hybvit")
    cfg.model.dim, cfg.model.depth, cfg.model.heads = 32, 2, 2
    model = ViT(cfg.model).eval()
    run = Run(model, cfg, GaussianDiffusion.from_config(cfg.diffusion), torch.device("cpu"))
    data = load_data("digits")
    a = evaluate_bpd(run, data.x_test, num_images=8, timesteps=10, batch_size=16, seed=0)
    b = evaluate_bpd(run, data.x_test, num_images=8, timesteps=10, batch_size=16, seed=0)
    c = evaluate_bpd(run, data.x_test, num_images=8, timesteps=10, batch_size=16, seed=1)
    assert a == b
    assert a["bits_per_dim"] != c["bits_per_dim"]
    assert a["num_images"] == 8 and a["timesteps"] == 10 and a["estimator"].startswith("unbiased estimate")
    assert a["protocol"].startswith("paper: predicted x_0 clamped")
    values = [a["bits_per_dim"], a["std_error"], *a["terms"].values()]
    assert all(isinstance(v, float) and math.isfinite(v) for v in values)
    assert a["bits_per_dim"] == pytest.approx(sum(a["terms"].values()), rel=1e-9)
    assert a["bits_per_dim"] > 0
    # the full bound through the same path, on a 20-step diffusion to keep it quick
    short = Run(model, cfg, GaussianDiffusion(20, "cosine"), torch.device("cpu"))
    full = evaluate_bpd(short, data.x_test[:3], batch_size=64, seed=0, progress=True)   # default: every image
    assert full["estimator"].startswith("full bound") and full["timesteps"] == 20 and full["num_images"] == 3
    assert math.isfinite(full["bits_per_dim"]) and full["bits_per_dim"] > 0
    # a v-prediction run's output is converted to eps before the bound (diffusion.eps_model)
    v_run = Run(model, cfg, GaussianDiffusion(20, "cosine", prediction="v"), torch.device("cpu"))
    v_full = evaluate_bpd(v_run, data.x_test, num_images=3, batch_size=64, seed=0)
    assert math.isfinite(v_full["bits_per_dim"]) and v_full["bits_per_dim"] != full["bits_per_dim"]
    with pytest.raises(HybvitError):
        evaluate_bpd(run, to_float(data.x_test), num_images=2)
