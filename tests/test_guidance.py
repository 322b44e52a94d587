"""Self-guided class-conditional sampling (the HybViT's own classifier steers its own diffusion)."""
import pytest
import torch

from hybvit.data import load_data
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
    cfg.train.num_samples, cfg.train.fd_samples, cfg.train.sample_steps, cfg.train.device = 4, 0, 3, "cpu"
    out = tmp_path_factory.mktemp("hyb")
    train(cfg, load_data("digits"), out, progress=False)
    return load_run(out, device="cpu")


def test_scale_zero_is_unguided_and_guidance_steers_toward_the_class(hyb_run):
    run = hyb_run
    assert torch.equal(sample_class(run, 3, 12, scale=0, steps=10), run.sample(12, steps=10))
    unguided = run.sample(60, steps=10, seed=1)
    base = (run.classify(unguided).argmax(1) == 7).float().mean().item()
    guided = sample_class(run, 7, 60, scale=4.0, steps=10, seed=1)
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
    images = np.load(tmp_path / "s.npz")["images"]
    assert images.shape == (12, 8, 8, 1) and images.dtype == np.uint8
    logits = hyb_run.classify(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())
    assert (logits.argmax(1) == 7).float().mean() > 0.5
    assert main(["sample", "--run", str(hyb_run.path), "--guidance-scale", "2", "--num", "2",
                 "--out", str(tmp_path / "x.png")]) == 2
    assert "--class" in capsys.readouterr().err
    assert main(["sample", "--run", str(hyb_run.path), "--class", "12", "--num", "2",
                 "--out", str(tmp_path / "y.png")]) == 2
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "y.png").exists()
