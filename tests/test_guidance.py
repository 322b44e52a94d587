"""Self-guided class-conditional sampling (the HybViT's own classifier steers its own diffusion)."""
import pytest
import torch

from hybvit.datasets import load_data
from hybvit.errors import HybvitError
from hybvit.guidance import sample_class
from hybvit.sample import load_run
from hybvit.train import train


@pytest.fixture(scope="module")
def hyb_run(tmp_path_factory):
    from hybvit.config import preset_config
    cfg = preset_config("digits-hybvit")
    cfg.model.dim, cfg.model.depth, cfg.model.heads = 48, 2, 2
    cfg.train.steps, cfg.train.batch_size, cfg.train.lr, cfg.train.warmup_epochs = 250, 64, 3e-3, 0
    cfg.train.fd_samples, cfg.train.device = 0, "cpu"
    out = tmp_path_factory.mktemp("hyb")
    train(cfg, load_data("digits"), out, progress=False)
    return load_run(out, device="cpu")


def test_guided_eps_is_eps_minus_scale_sigma_times_the_analytic_gradient():
    """Linear denoiser eps = W x and linear classifier logits = V x0: the gradient of log p(y | x0_hat(x_t)) is
    (I - sigma W)^T V^T (onehot - p) / alpha through the denoiser, and V^T (onehot - p) / alpha with eps fixed."""
    from hybvit.diffusion import GaussianDiffusion
    from hybvit.guidance import self_guided_eps
    torch.manual_seed(0)
    diffusion = GaussianDiffusion(timesteps=1000)
    n, k, label, scale = 8, 3, 1, 2.5
    W, V = 0.3 * torch.randn(n, n, dtype=torch.float64), torch.randn(k, n, dtype=torch.float64)
    eps_model = lambda x, t: x.flatten(1) @ W.T                          # noqa: E731
    classify = lambda x0: x0.flatten(1) @ V.T                            # noqa: E731
    x, t = 0.05 * torch.randn(4, n, dtype=torch.float64), torch.tensor([100, 400, 700, 900])
    a = diffusion.sqrt_alphas_cumprod[t].to(torch.float64)[:, None]
    b = diffusion.sqrt_one_minus_alphas_cumprod[t].to(torch.float64)[:, None]
    e = eps_model(x, t)
    x0 = (x - b * e) / a
    assert x0.abs().max() < 1                                            # the [-1, 1] clamp is inactive here
    resid = torch.nn.functional.one_hot(torch.tensor(label), k).double() - (x0 @ V.T).softmax(1)   # (4, k)
    through_classifier = resid @ V / a
    through_denoiser = torch.stack([(torch.eye(n, dtype=torch.float64) - b[i] * W).T @ (resid[i] @ V) / a[i]
                                    for i in range(4)])
    for through, grad in (("classifier", through_classifier), ("denoiser", through_denoiser)):
        guided = self_guided_eps(classify, eps_model, diffusion, label, scale, through)(x, t)
        assert torch.allclose(guided, e - scale * b * grad, atol=1e-10), through
    assert not torch.allclose(through_classifier, through_denoiser, atol=1e-3)


@pytest.mark.parametrize("through", ["denoiser", "classifier"])
def test_scale_zero_is_unguided_and_guidance_steers_toward_the_class(hyb_run, through):
    run = hyb_run
    assert torch.equal(sample_class(run, 3, 12, scale=0, steps=10, eta=0.0), run.sample(12, steps=10))
    assert torch.equal(sample_class(run, 3, 12, scale=0, steps=10), run.sample(12, steps=10, eta=1.0))
    unguided = run.sample(60, steps=10, seed=1)
    base = (run.classify(unguided).argmax(1) == 7).float().mean().item()
    guided = sample_class(run, 7, 60, scale=4.0, steps=10, seed=1, through=through)
    hit = (run.classify(guided).argmax(1) == 7).float().mean().item()
    assert guided.shape == unguided.shape and guided.min() >= -1 and guided.max() <= 1
    assert hit > max(0.5, base + 0.3), (base, hit)


def test_guidance_needs_a_hybvit_and_a_valid_class(hyb_run):
    with pytest.raises(HybvitError, match="out of range"):
        sample_class(hyb_run, 10, 2)


def test_sample_class_from_the_command_line(hyb_run, tmp_path, capsys):
    from hybvit.cli import main
    rc = main(["sample", "--run", str(hyb_run.path), "--class", "7", "--guidance-scale", "4", "--num", "12",
               "--steps", "10", "--seed", "1", "--out", str(tmp_path / "s.npz")])
    assert rc == 0
    import numpy as np
    images = np.load(tmp_path / "s.npz")["arr_0"]
    assert images.shape == (12, 8, 8, 1) and images.dtype == np.uint8
    logits = hyb_run.classify(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())
    assert (logits.argmax(1) == 7).float().mean() > 0.5
    assert main(["sample", "--run", str(hyb_run.path), "--guidance-scale", "2", "--num", "2",
                 "--out", str(tmp_path / "x.png")]) == 2
    assert "--class" in capsys.readouterr().err
    assert main(["sample", "--run", str(hyb_run.path), "--class", "12", "--num", "2",
                 "--out", str(tmp_path / "y.png")]) == 2
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "y.png").exists()
