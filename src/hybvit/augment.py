"""Augmentation of the classification batch (the diffusion batch gets none; REFERENCE-NOTES).

The official CIFAR recipe, in order: random crop with padding, horizontal flip, AutoAugment (CIFAR policy),
random erasing (p 0.25), then with probability 0.5 CutMix (beta 1) or Mixup (alpha 1) with soft labels; label
smoothing 0.1 is applied in the loss. Every random choice is drawn per sample from the step's generator, so a
resumed run sees the same augmentations as an uninterrupted one. AutoAugment / RandAugment and random erasing come
from torchvision.transforms.v2 (applied image by image: on a batch they would draw one choice for all).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .data import augment as crop_flip
from .data import to_float
from .errors import HybvitError

POLICIES = ("none", "cifar10", "imagenet", "svhn", "rand")


def _policy(name: str):
    from torchvision.transforms import v2
    if name == "rand":
        return v2.RandAugment()
    key = {"cifar10": "CIFAR10", "imagenet": "IMAGENET", "svhn": "SVHN"}.get(name)
    if key is None:
        raise HybvitError(f"unknown data.autoaugment '{name}'; use one of {', '.join(POLICIES)}")
    return v2.AutoAugment(getattr(v2.AutoAugmentPolicy, key))


def _per_image(transform, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Apply a torchvision transform to each image with the global RNG seeded from `generator` (then restored)."""
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.stack([transform(img) for img in x])


def mix(x: torch.Tensor, y: torch.Tensor, num_classes: int, prob: float, alpha: float,
        generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample, with probability `prob`, CutMix or Mixup (even odds) with a random partner from the batch.
    Returns the mixed images and soft targets (B, num_classes) whose rows sum to 1."""
    B, _, H, W = x.shape
    onehot = F.one_hot(y, num_classes).float()
    apply = torch.rand(B, generator=generator) < prob
    cutmix = torch.rand(B, generator=generator) < 0.5
    partner = torch.randperm(B, generator=generator)
    rng = np.random.default_rng(int(torch.randint(0, 2 ** 62, (1,), generator=generator)))
    lam = torch.from_numpy(rng.beta(alpha, alpha, size=B)).float()
    # CutMix: a box of area (1 - lam) * H * W at a uniform centre, clipped to the image (Yun et al., 2019)
    cut = torch.sqrt(1 - lam)
    cy, cx = torch.randint(0, H, (B,), generator=generator), torch.randint(0, W, (B,), generator=generator)
    hh, hw = (cut * H / 2).long(), (cut * W / 2).long()
    y1, y2 = (cy - hh).clamp(0, H), (cy + hh).clamp(0, H)
    x1, x2 = (cx - hw).clamp(0, W), (cx + hw).clamp(0, W)
    rows, cols = torch.arange(H)[None, :, None], torch.arange(W)[None, None, :]
    box = (rows >= y1[:, None, None]) & (rows < y2[:, None, None]) & (cols >= x1[:, None, None]) & (cols < x2[:, None, None])
    lam_cut = 1 - ((y2 - y1) * (x2 - x1)).float() / (H * W)
    use_box = (apply & cutmix)[:, None, None] & box                                   # (B, H, W)
    use_mixup = apply & ~cutmix
    dev = x.device
    other = x[partner.to(dev)]
    lam_mix = lam.to(dev)[:, None, None, None]
    out = torch.where(use_mixup.to(dev)[:, None, None, None], lam_mix * x + (1 - lam_mix) * other, x)
    out = torch.where(use_box.to(dev)[:, None], other, out)
    lam_eff = torch.where(apply, torch.where(cutmix, lam_cut, lam), torch.ones(B)).to(dev)
    target = lam_eff[:, None] * onehot + (1 - lam_eff[:, None]) * onehot[partner.to(dev)]
    return out, target


def classifier_batch(x_uint8: torch.Tensor, y: torch.Tensor, num_classes: int, data_cfg,
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (B, C, H, W) and labels -> float images in [-1, 1] and targets (labels, or soft labels when
    CutMix/Mixup is on), augmented as data_cfg says."""
    x = crop_flip(x_uint8, data_cfg.crop_padding, data_cfg.hflip, generator)
    if data_cfg.autoaugment != "none":
        if x.shape[1] != 3:
            raise HybvitError("data.autoaugment needs RGB images; set data.autoaugment=none for this data")
        x = _per_image(_policy(data_cfg.autoaugment), x.cpu(), generator).to(x_uint8.device)
    x = to_float(x)
    if data_cfg.random_erasing > 0:
        from torchvision.transforms import v2
        x = _per_image(v2.RandomErasing(p=data_cfg.random_erasing, value=0.0), x.cpu(), generator).to(x_uint8.device)
    if data_cfg.mix_prob > 0:
        return mix(x, y, num_classes, data_cfg.mix_prob, data_cfg.mix_alpha, generator)
    return x, y
