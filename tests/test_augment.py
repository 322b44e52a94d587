import torch

from hybvit.augment import classifier_batch, mix
from hybvit.config import DataConfig, preset_config
from hybvit.data import Batches, load_data, to_float


def strong():
    return DataConfig(crop_padding=4, hflip=True, autoaugment="cifar10", random_erasing=0.25, mix_prob=0.5)


def test_classifier_batch_shapes_ranges_and_soft_labels():
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    y = torch.randint(0, 10, (64,))
    out, target = classifier_batch(x, y, 10, strong(), torch.Generator().manual_seed(0))
    assert out.shape == (64, 3, 32, 32) and out.dtype == torch.float32
    assert out.min() >= -1 and out.max() <= 1
    assert target.shape == (64, 10) and (target >= 0).all()
    assert torch.allclose(target.sum(1), torch.ones(64))
    mixed = (target.max(1).values < 1).sum().item()
    assert 10 < mixed < 54  # about half the samples are mixed: drawn per sample, not once per batch
    again, target2 = classifier_batch(x, y, 10, strong(), torch.Generator().manual_seed(0))
    assert torch.equal(out, again) and torch.equal(target, target2)  # a pure function of the step's generator
    other, _ = classifier_batch(x, y, 10, strong(), torch.Generator().manual_seed(1))
    assert not torch.equal(out, other)


def test_no_augmentation_is_identity():
    x = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    y = torch.arange(8) % 3
    out, target = classifier_batch(x, y, 3, DataConfig(), torch.Generator().manual_seed(0))
    assert torch.equal(out, to_float(x)) and torch.equal(target, y)


def test_cutmix_label_weight_is_the_pasted_area():
    B, H = 16, 8
    x = torch.arange(B, dtype=torch.float32)[:, None, None, None].expand(B, 1, H, H).contiguous()  # image i == i
    y = torch.arange(B)
    out, target = mix(x, y, B, prob=1.0, alpha=1.0, generator=torch.Generator().manual_seed(3))
    for i in range(B):
        own = target[i, i].item()
        values = out[i].unique()
        if len(values) <= 2 and (out[i] == i).any():  # CutMix or an untouched sample: pixels are i or the partner's
            assert abs((out[i] == i).float().mean().item() - own) < 1e-6
        else:  # Mixup: a constant blend lam * i + (1 - lam) * j
            others = target[i].clone()
            others[i] = 0
            j = others.argmax().item()
            assert torch.allclose(out[i], torch.full_like(out[i], own * i + (1 - own) * j), atol=1e-4)


def test_diffusion_branch_is_never_augmented(tmp_path, monkeypatch):
    from hybvit.diffusion import GaussianDiffusion
    from hybvit.train import train
    seen = []
    original = GaussianDiffusion.noised
    monkeypatch.setattr(GaussianDiffusion, "noised", lambda self, x0, generator=None: (seen.append(x0.clone()), original(self, x0, generator))[1])
    cfg = preset_config("digits-hybvit")
    cfg.model.dim, cfg.model.depth, cfg.model.heads = 32, 1, 2
    cfg.train.steps, cfg.train.batch_size, cfg.train.fd_samples, cfg.train.num_samples = 3, 16, 0, 2
    cfg.train.sample_steps, cfg.train.device = 2, "cpu"
    cfg.data.crop_padding, cfg.data.hflip, cfg.data.random_erasing, cfg.data.mix_prob = 2, True, 1.0, 1.0
    data = load_data("digits")
    train(cfg, data, tmp_path, progress=False)
    batches = Batches(len(data.x_train), 16, cfg.train.seed, stream=1)
    for step in range(3):
        assert torch.equal(seen[step], to_float(data.x_train[batches.indices(step)]))


def test_paper_presets_turn_the_recipe_on():
    d = preset_config("cifar10-hybvit").data
    assert (d.crop_padding, d.hflip, d.autoaugment, d.random_erasing, d.mix_prob) == (4, True, "cifar10", 0.25, 0.5)
    assert preset_config("cifar10-hybvit").train.label_smoothing == 0.1
    assert not preset_config("cifar10-hybvit").data.diffusion_hflip
