import math

import numpy as np
import pytest
import torch

from hybvit.diffusion import GaussianDiffusion, cosine_betas, linear_betas


def test_cosine_schedule_closed_form():
    T, s = 1000, 0.008
    d = GaussianDiffusion(T, "cosine")
    f = lambda u: math.cos((u / T + s) / (1 + s) * math.pi / 2) ** 2
    expected = np.array([f(t + 1) / f(0) for t in range(T)])
    abar = d.alphas_cumprod.numpy()
    unclipped = cosine_betas(T) < 0.999
    # alpha-bar follows f(t)/f(0) exactly wherever beta was not clipped (all but the last steps)
    k = np.argmin(unclipped) if not unclipped.all() else T
    assert k > 990
    np.testing.assert_allclose(abar[:k], expected[:k], rtol=1e-10)
    assert cosine_betas(T).max() <= 0.999 and cosine_betas(T).min() > 0


def test_linear_schedule():
    b = linear_betas(1000)
    assert b[0] == pytest.approx(1e-4) and b[-1] == pytest.approx(0.02)
    np.testing.assert_allclose(np.diff(b), (0.02 - 1e-4) / 999)
    d = GaussianDiffusion(1000, "linear")
    np.testing.assert_allclose(d.alphas_cumprod.numpy(), np.cumprod(1 - b))


def test_q_sample_moments():
    d = GaussianDiffusion(1000, "cosine")
    torch.manual_seed(0)
    x0 = torch.full((200_000,), 0.7)
    for step in (0, 250, 999):
        t = torch.full((200_000,), step)
        xt = d.q_sample(x0, t, torch.randn_like(x0))
        abar = float(d.alphas_cumprod[step])
        assert xt.mean().item() == pytest.approx(math.sqrt(abar) * 0.7, abs=0.01)
        assert xt.var().item() == pytest.approx(1 - abar, abs=0.01 * max(1 - abar, 1e-3) + 1e-5)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_posterior_equals_gaussian_algebra(schedule):
    """q(x_{t-1}|x_t,x_0) is proportional to q(x_t|x_{t-1}) q(x_{t-1}|x_0): multiply the two Gaussians."""
    d = GaussianDiffusion(1000, schedule)
    x0 = torch.tensor([0.3, -0.8, 0.1], dtype=torch.float64)
    xt = torch.tensor([1.2, -0.1, 0.5], dtype=torch.float64)
    for step in (1, 17, 500, 998):
        t = torch.full((3,), step)
        beta = float(d.betas[step])
        abar_prev = float(d.alphas_cumprod[step - 1])
        precision = (1 - beta) / beta + 1 / (1 - abar_prev)
        mean = (math.sqrt(1 - beta) * xt / beta + math.sqrt(abar_prev) * x0 / (1 - abar_prev)) / precision
        m, v, logv = d.q_posterior(x0, xt, t)
        np.testing.assert_allclose(m.numpy(), mean.numpy(), rtol=1e-9)
        np.testing.assert_allclose(v.numpy().ravel(), 1 / precision, rtol=1e-9)
        np.testing.assert_allclose(logv.numpy().ravel(), math.log(1 / precision), rtol=1e-9)


def test_predict_x0_inverts_q_sample():
    d = GaussianDiffusion(1000)
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    t = torch.tensor([0, 10, 500, 990])
    noise = torch.randn_like(x0)
    np.testing.assert_allclose(d.predict_x0(d.q_sample(x0, t, noise), t, noise), x0, atol=1e-3)


def test_loss_types():
    d1, d2 = GaussianDiffusion(1000, loss="l1"), GaussianDiffusion(1000, loss="l2")
    out, noise, x0, t = torch.zeros(10, 1), torch.full((10, 1), 2.0), torch.randn(10, 1), torch.arange(10) * 99
    assert d1.output_loss(out, x0, t, noise).item() == pytest.approx(2.0)     # |0 - 2|, whatever x0 and t
    assert d2.output_loss(out, x0, t, noise).item() == pytest.approx(4.0)     # (0 - 2)^2


# ------------------------------------------------------------------ the Gaussian oracle
# Data x0 ~ N(mu, s^2) per pixel. Then x_t = a x0 + b eps is Gaussian and the exact noise predictor is
# E[eps | x_t] = b / (a^2 s^2 + b^2) * (x_t - a mu). A correct sampler driven by it must give back mu and s.
MU, S = 0.2, 0.3


def oracle(d):
    def eps(xt, t):
        a = d.sqrt_alphas_cumprod[t].to(xt.dtype).reshape(-1, 1)
        b = d.sqrt_one_minus_alphas_cumprod[t].to(xt.dtype).reshape(-1, 1)
        return b / (a ** 2 * S ** 2 + b ** 2) * (xt - a * MU)
    return eps


def test_oracle_ancestral_recovers_data_distribution():
    d = GaussianDiffusion(1000, "cosine")
    g = torch.Generator().manual_seed(0)
    x = d.sample_ancestral(oracle(d), (100_000, 1), generator=g, device="cpu").double()
    assert x.mean().item() == pytest.approx(MU, abs=0.004)
    # clamping x0 to [-1, 1] trims the tails a little: 0.296 computed independently in numpy
    assert x.std().item() == pytest.approx(0.296, abs=0.004)


@pytest.mark.parametrize("steps,expected_std", [(50, 0.286), (20, 0.267), (10, 0.233)])
def test_oracle_ddim_recovers_data_distribution(steps, expected_std):
    d = GaussianDiffusion(1000, "cosine")
    g = torch.Generator().manual_seed(1)
    x = d.sample_ddim(oracle(d), (100_000, 1), steps=steps, eta=0.0, generator=g).double()
    assert x.mean().item() == pytest.approx(MU, abs=0.004)
    assert x.std().item() == pytest.approx(expected_std, abs=0.004)
    if steps == 50:
        assert abs(x.std().item() - S) < 0.02


def test_oracle_ddim_eta1_is_close_to_ancestral():
    d = GaussianDiffusion(1000, "cosine")
    x = d.sample_ddim(oracle(d), (100_000, 1), steps=200, eta=1.0, generator=torch.Generator().manual_seed(2))
    assert x.mean().item() == pytest.approx(MU, abs=0.005)
    assert x.std().item() == pytest.approx(S, abs=0.01)


def test_a_wrong_predictor_is_caught():
    """The oracle check is not vacuous: a predictor for the wrong data scale gives the wrong spread."""
    d = GaussianDiffusion(1000, "cosine")
    def wrong(xt, t):
        a = d.sqrt_alphas_cumprod[t].to(xt.dtype).reshape(-1, 1)
        b = d.sqrt_one_minus_alphas_cumprod[t].to(xt.dtype).reshape(-1, 1)
        return b / (a ** 2 * 0.5 ** 2 + b ** 2) * (xt - a * MU)
    x = d.sample_ddim(wrong, (20_000, 1), steps=50, generator=torch.Generator().manual_seed(3))
    assert abs(x.std().item() - 0.286) > 0.05


def test_ddim_timesteps():
    d = GaussianDiffusion(1000)
    ts = d.ddim_timesteps(50)
    assert ts[0] == 999 and ts[-1] == 0 and len(ts) == 50 and ts == sorted(ts, reverse=True)
    assert d.ddim_timesteps(1000) == list(range(999, -1, -1))


# ------------------------------------------------------------------ DPM-Solver++
def test_dpm_solver_order1_is_ddim():
    d = GaussianDiffusion(1000, "cosine")
    a = d.sample_dpm_solver(oracle(d), (5000, 1), steps=10, order=1, spacing="time",
                            generator=torch.Generator().manual_seed(4))
    b = d.sample_ddim(oracle(d), (5000, 1), steps=10, generator=torch.Generator().manual_seed(4))
    assert (a - b).abs().max() < 1e-3 and (a - b).abs().mean() < 5e-5   # the same update, float32 round-off


@pytest.mark.parametrize("order,cases", [(2, ((20, 0.006), (10, 0.012), (200, 0.002))),
                                         (3, ((20, 0.006), (15, 0.01), (200, 0.002)))])
def test_dpm_solver_closes_the_few_step_gap(order, cases):
    """At 20 and 10 network evaluations, DDIM under-disperses (0.267, 0.233); DPM-Solver++ (logSNR spacing) gets
    close to the 1000-step answer (0.299 with the x0 clamp), and converges to it with more steps. (3rd order
    overshoots at 10 steps or fewer: 0.35.)"""
    d = GaussianDiffusion(1000, "cosine")
    for steps, tol in cases:
        x = d.sample_dpm_solver(oracle(d), (100_000, 1), steps=steps, order=order,
                                generator=torch.Generator().manual_seed(5)).double()
        assert x.mean().item() == pytest.approx(MU, abs=0.004)
        assert x.std().item() == pytest.approx(0.299, abs=tol), (steps, x.std().item())


def test_solver_timesteps():
    d = GaussianDiffusion(1000)
    for spacing in ("logsnr", "time"):
        for k in (1, 5, 20, 1000):
            ts = d.solver_timesteps(k, spacing)
            assert len(ts) == k and ts == sorted(set(ts), reverse=True) and ts[0] == 999 and (k == 1 or ts[-1] == 0)
    lam = d.half_logsnr.numpy()[d.solver_timesteps(20)]
    gaps = np.diff(lam)[1:]                     # after the first step, even in lambda
    assert gaps.max() < 2 * gaps.min()


def test_schedule_ddim_step_and_dpm_solver_match_diffusers():
    """Numeric reference: diffusers' schedulers (in the [test] extra, so this runs wherever the suite runs)."""
    import diffusers
    d = GaussianDiffusion(1000, "cosine")
    ddpm = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    np.testing.assert_allclose(d.betas.numpy(), ddpm.betas.double().numpy(), atol=1e-6)  # diffusers keeps float32
    # one DDIM step t=500 -> 480, eta 0, x0 clipped to [-1, 1] in both
    ddim = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=True,
                                   set_alpha_to_one=True, timestep_spacing="leading")
    ddim.set_timesteps(50)
    x = torch.randn(2000, 1, generator=torch.Generator().manual_seed(0)).double()
    eps = oracle(d)(x, torch.full((2000,), 500))
    ref = ddim.step(eps, 500, x, eta=0.0).prev_sample
    mine = d.ddim_step(x, eps, 500, 480)
    np.testing.assert_allclose(mine.numpy(), ref.numpy(), atol=1e-5)
    # a whole DPM-Solver++ run on the same timesteps (no clamping): orders 1-3
    for order in (1, 2, 3):
        for steps in (8, 20):
            ts = d.solver_timesteps(steps)
            sched = diffusers.DPMSolverMultistepScheduler(
                num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", algorithm_type="dpmsolver++",
                solver_order=order, lower_order_final=True, final_sigmas_type="zero")
            sched.set_timesteps(timesteps=ts)
            x = torch.randn(1000, 1, generator=torch.Generator().manual_seed(1)).double()
            for t in sched.timesteps:
                x = sched.step(oracle(d)(x, torch.full((1000,), int(t))), t, x).prev_sample
            mine = d.sample_dpm_solver(lambda a, t: oracle(d)(a.double(), t), (1000, 1), steps=steps, order=order,
                                       clip=False, generator=torch.Generator().manual_seed(1))
            np.testing.assert_allclose(mine.double().numpy(), x.numpy(), atol=1e-4, err_msg=f"{order} {steps}")


def test_v_prediction_converts_to_eps_and_its_loss_is_zero_at_the_truth():
    d = GaussianDiffusion(1000, "cosine", loss="l2", prediction="v")
    eps_true = oracle(d)
    def v_net(xt, t):                                       # the oracle, expressed as v = alpha eps - sigma x0
        a = d.sqrt_alphas_cumprod[t].to(xt.dtype).reshape(-1, 1)
        b = d.sqrt_one_minus_alphas_cumprod[t].to(xt.dtype).reshape(-1, 1)
        e = eps_true(xt, t)
        return a * e - b * (xt - b * e) / a
    xt, t = torch.randn(500, 1, dtype=torch.float64), torch.randint(0, 1000, (500,))
    np.testing.assert_allclose(d.eps_model(v_net)(xt, t).numpy(), eps_true(xt, t).numpy(), atol=1e-6)
    x0, noise = torch.randn(500, 1, dtype=torch.float64), torch.randn(500, 1, dtype=torch.float64)
    xt = d.q_sample(x0, t, noise)
    a = d.sqrt_alphas_cumprod[t].reshape(-1, 1)
    b = d.sqrt_one_minus_alphas_cumprod[t].reshape(-1, 1)
    assert d.output_loss(a * noise - b * x0, x0, t, noise).item() < 1e-10
    assert d.output_loss(noise, x0, t, noise).item() > 0.1          # eps is not v


def test_min_snr_weights():
    d = GaussianDiffusion(1000, "cosine", loss="l2", weighting="min-snr", min_snr_gamma=5.0)
    t = torch.tensor([0, 300, 600, 999])
    x0, noise = torch.zeros(4, 2), torch.zeros(4, 2)
    out = torch.ones(4, 2)                                            # squared error 1 per sample
    abar = d.alphas_cumprod[t]
    snr = abar / (1 - abar)
    expected = (torch.minimum(snr, torch.tensor(5.0)) / snr).mean()
    assert d.output_loss(out, x0, t, noise).item() == pytest.approx(expected.item(), rel=1e-6)
    assert (torch.minimum(snr, torch.tensor(5.0)) / snr)[0] < 0.01    # t = 0 (SNR ~ 2.5e4) nearly ignored
    plain = GaussianDiffusion(1000, "cosine", loss="l2")
    assert plain.output_loss(out, x0, t, noise).item() == pytest.approx(1.0)



def test_training_times_are_uniform():
    """noised draws t ~ U{0..T-1}: over 20,000 draws every decile of [0, T) holds a tenth (sd 0.002), and both
    ends are reached."""
    t = GaussianDiffusion(1000, "cosine").noised(torch.zeros(20000, 1, 1, 1), torch.Generator().manual_seed(0))[1]
    assert int(t.min()) == 0 and int(t.max()) == 999
    share = torch.bincount(t // 100, minlength=10).double() / len(t)
    assert (share - 0.1).abs().max() < 0.01
