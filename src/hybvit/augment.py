"""Augmentation of the classification batch, and optional non-leaking augmentation of the diffusion batch.

The paper never augments the diffusion batch (REFERENCE-NOTES); `diffusion_geometric` at the end is beyond it.

The official CIFAR recipe, in order: random crop with padding, horizontal flip, AutoAugment (CIFAR policy),
random erasing (p 0.25), then with probability 0.5 CutMix (beta 1) or Mixup (alpha 1) with soft labels; label
smoothing 0.1 is applied in the loss. Every random choice is drawn per sample from the step's generator, so a
resumed run sees the same augmentations as an uninterrupted one. AutoAugment / RandAugment and random erasing come
from torchvision.transforms.v2: by default their functional operations run on batches grouped by the operation
each image drew (fast on the CPU, and on a GPU the augmentation never leaves the device); `augment_backend=
torchvision` applies the transform objects image by image on the CPU instead (a transform called on a batch would
draw one choice for all images).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .config import POLICIES
from .data import to_float
from .errors import HybvitError



def crop_flip(x: torch.Tensor, crop_padding: int, hflip: bool, generator: torch.Generator) -> torch.Tensor:
    """Per-sample random crop (black padding) and horizontal flip on a batch (B, C, H, W): uint8 or float in [-1, 1]."""
    B, _, H, W = x.shape
    if crop_padding > 0:
        p = crop_padding
        black = 0 if x.dtype == torch.uint8 else -1.0  # pad with black, as RandomCrop does
        padded = F.pad(x, (p, p, p, p), value=black)
        dy = torch.randint(0, 2 * p + 1, (B,), generator=generator)
        dx = torch.randint(0, 2 * p + 1, (B,), generator=generator)
        rows = (dy[:, None] + torch.arange(H)[None]).to(x.device)  # (B, H)
        cols = (dx[:, None] + torch.arange(W)[None]).to(x.device)  # (B, W)
        b = torch.arange(B, device=x.device)[:, None, None]
        x = padded.permute(0, 2, 3, 1)[b, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    if hflip:
        flip = (torch.rand(B, generator=generator) < 0.5).to(x.device)
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x.contiguous()


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


# ---- batched, device-resident augmentation -------------------------------------------------------------------
# The per-sample random choices are drawn on the CPU from the step's generator; images are then grouped by the
# operation (and magnitude) they drew, and each group goes through one batched torchvision.transforms.v2.functional
# call on whatever device holds the images. On a GPU this keeps the uint8 dataset and its augmentation on the
# device (no CPU workers, no host synchronisation); on a CPU it is several times faster than image by image.

# Operation magnitudes at bin b of n (the AutoAugment / RandAugment search space, Cubuk et al. 2019/2020, as
# torchvision defines it); `True` marks operations whose sign is drawn at random.
_SPACE = {
    "Identity": (lambda f, H, W: None, False),
    "ShearX": (lambda f, H, W: 0.3 * f, True),
    "ShearY": (lambda f, H, W: 0.3 * f, True),
    "TranslateX": (lambda f, H, W: 150.0 / 331.0 * W * f, True),
    "TranslateY": (lambda f, H, W: 150.0 / 331.0 * H * f, True),
    "Rotate": (lambda f, H, W: 30.0 * f, True),
    "Brightness": (lambda f, H, W: 0.9 * f, True),
    "Color": (lambda f, H, W: 0.9 * f, True),
    "Contrast": (lambda f, H, W: 0.9 * f, True),
    "Sharpness": (lambda f, H, W: 0.9 * f, True),
    "Posterize": (lambda f, H, W: round(8 - 4 * f), False),
    "Solarize": (lambda f, H, W: 1.0 - f, False),
    "AutoContrast": (lambda f, H, W: None, False),
    "Equalize": (lambda f, H, W: None, False),
    "Invert": (lambda f, H, W: None, False),
}
_RAND_OPS = [op for op in _SPACE if op != "Invert"]          # RandAugment's 14 operations
_RAND_NUM_OPS, _RAND_MAGNITUDE, _RAND_BINS = 2, 9, 31      # torchvision's RandAugment defaults


def _apply(x: torch.Tensor, op: str, m) -> torch.Tensor:
    """One operation with one magnitude on a uint8 batch (B, C, H, W); nearest interpolation, fill 0."""
    from torchvision.transforms.v2 import functional as TF
    if op == "Identity":
        return x
    if op in ("ShearX", "ShearY"):
        shear = [math.degrees(math.atan(m)), 0.0] if op == "ShearX" else [0.0, math.degrees(math.atan(m))]
        return TF.affine(x, angle=0.0, translate=[0, 0], scale=1.0, shear=shear, center=[0, 0])
    if op in ("TranslateX", "TranslateY"):
        shift = [int(m), 0] if op == "TranslateX" else [0, int(m)]
        return TF.affine(x, angle=0.0, translate=shift, scale=1.0, shear=[0.0, 0.0])
    if op == "Rotate":
        return TF.rotate(x, angle=m)
    if op == "Brightness":
        return TF.adjust_brightness(x, 1.0 + m)
    if op == "Color":
        return TF.adjust_saturation(x, 1.0 + m)
    if op == "Contrast":
        return TF.adjust_contrast(x, 1.0 + m)
    if op == "Sharpness":
        return TF.adjust_sharpness(x, 1.0 + m)
    if op == "Posterize":
        return TF.posterize(x, bits=m)
    if op == "Solarize":
        return TF.solarize(x, threshold=255.0 * m)
    if op == "AutoContrast":
        return TF.autocontrast(x)
    if op == "Equalize":
        return TF.equalize(x)
    return TF.invert(x)


def _policy_table(name: str) -> list:
    """The sub-policies of torchvision's AutoAugment for `name`: [((op, p, bin), (op, p, bin)), ...]."""
    table = getattr(_policy(name), "_policies", None)
    if not table:
        raise HybvitError("this torchvision does not expose AutoAugment's policy table; "
                          "set data.augment_backend=torchvision")
    return table


def _apply_groups(x: torch.Tensor, groups: dict) -> None:
    """groups: {(op, magnitude): [image indices]}; applies each group's operation in place, one batched call each."""
    for (op, m), rows in groups.items():
        i = torch.tensor(rows, device=x.device)
        x[i] = _apply(x[i], op, m)


def auto_augment_batched(x: torch.Tensor, name: str, generator: torch.Generator) -> torch.Tensor:
    """AutoAugment (policy `name`) or RandAugment (`rand`) drawn per image, applied in batched groups.

    The same distribution as torchvision's transform applied image by image: AutoAugment picks one sub-policy per
    image and applies each of its two operations with that operation's probability and a random sign;
    RandAugment applies 2 operations drawn uniformly from 14, at magnitude bin 9 of 31, with a random sign."""
    B, _, H, W = x.shape
    out = x.clone()
    if name == "rand":
        slots = [[(_RAND_OPS[k], 1.0, _RAND_MAGNITUDE) for k in torch.randint(len(_RAND_OPS), (B,), generator=generator).tolist()]
                 for _ in range(_RAND_NUM_OPS)]
        bins = _RAND_BINS
    else:
        table = _policy_table(name)
        choice = torch.randint(len(table), (B,), generator=generator).tolist()
        slots = [[table[c][j] for c in choice] for j in range(2)]
        bins = 10
    for slot in slots:  # operations in order: every image's first operation, then every image's second
        u = torch.rand(B, generator=generator).tolist()
        neg = (torch.rand(B, generator=generator) < 0.5).tolist()
        groups: dict = {}
        for b, (op, p, bin_) in enumerate(slot):
            if u[b] > p or op == "Identity":
                continue
            m = None if bin_ is None else _SPACE[op][0](bin_ / (bins - 1), H, W)
            if _SPACE[op][1] and neg[b]:
                m = -m
            groups.setdefault((op, m), []).append(b)
        _apply_groups(out, groups)
    return out


def random_erasing_batched(x: torch.Tensor, p: float, generator: torch.Generator,
                           scale=(0.02, 0.33), ratio=(0.3, 3.3), attempts: int = 10) -> torch.Tensor:
    """Random erasing (Zhong et al., 2020) per image with probability p, value 0, in one masked operation:
    as torchvision, up to 10 attempts for a box of the drawn area and aspect ratio that fits the image."""
    B, _, H, W = x.shape
    apply = torch.rand(B, generator=generator) < p
    area = H * W * (scale[0] + (scale[1] - scale[0]) * torch.rand(B, attempts, generator=generator))
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * torch.rand(B, attempts, generator=generator)
    h = torch.sqrt(area * torch.exp(log_r)).round().long()
    w = torch.sqrt(area / torch.exp(log_r)).round().long()
    fits = (h < H) & (w < W)
    first = fits.float().argmax(1)                                  # the first attempt that fits
    ok = apply & fits.any(1)
    h, w = h.gather(1, first[:, None])[:, 0], w.gather(1, first[:, None])[:, 0]
    top = (torch.rand(B, generator=generator) * (H - h + 1)).long()
    left = (torch.rand(B, generator=generator) * (W - w + 1)).long()
    rows, cols = torch.arange(H)[None, :, None], torch.arange(W)[None, None, :]
    box = ((rows >= top[:, None, None]) & (rows < (top + h)[:, None, None]) & (cols >= left[:, None, None])
           & (cols < (left + w)[:, None, None]) & ok[:, None, None])      # (B, H, W)
    return x.masked_fill(box.to(x.device)[:, None], 0.0)


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
    CutMix/Mixup is on), augmented as data_cfg says, on the device that holds x_uint8.

    data_cfg.augment_backend: `batched` (default: grouped batched calls, any device) or `torchvision` (the
    transforms applied image by image on the CPU: the reference, and what a CPU data loader would do)."""
    x = crop_flip(x_uint8, data_cfg.crop_padding, data_cfg.hflip, generator)
    per_image = data_cfg.augment_backend == "torchvision"
    if data_cfg.autoaugment != "none":
        if x.shape[1] != 3:
            raise HybvitError("data.autoaugment needs RGB images; set data.autoaugment=none for this data")
        if per_image:
            x = _per_image(_policy(data_cfg.autoaugment), x.cpu(), generator).to(x_uint8.device)
        else:
            x = auto_augment_batched(x, data_cfg.autoaugment, generator)
    x = to_float(x)
    if data_cfg.random_erasing > 0:
        if per_image:
            from torchvision.transforms import v2
            x = _per_image(v2.RandomErasing(p=data_cfg.random_erasing, value=0.0), x.cpu(),
                           generator).to(x_uint8.device)
        else:
            x = random_erasing_batched(x, data_cfg.random_erasing, generator)
    if data_cfg.mix_prob > 0:
        return mix(x, y, num_classes, data_cfg.mix_prob, data_cfg.mix_alpha, generator)
    return x, y


# -- the diffusion batch: non-leaking geometric augmentation (beyond the paper) ---------------------------------
# Karras et al. (2022, EDM, appendix) augment the diffusion batch and tell the denoiser which transform each image
# got, so the transforms need not be in the data's distribution: sampling asks for "no transform" and the
# augmented images teach the network without leaking into the samples. Here a transform is one of the 8 symmetries
# of the square (k quarter turns, after a horizontal flip for d >= 4) followed by a shift of up to one pixel in
# each direction (black border); index 0 is the identity, 1..71 the others.
GEOMETRIC = [(0, 0, 0)] + [(d, dy, dx) for d in range(8) for dy in (-1, 0, 1) for dx in (-1, 0, 1)
                           if (d, dy, dx) != (0, 0, 0)]


def geometric_transform(x: torch.Tensor, index: int) -> torch.Tensor:
    """Transform GEOMETRIC[index] of square images (B, C, H, W) in [-1, 1]."""
    d, dy, dx = GEOMETRIC[index]
    if d >= 4:
        x = x.flip(-1)
    x = torch.rot90(x, d % 4, dims=(-2, -1))
    if dy or dx:
        H, W = x.shape[-2:]
        x = F.pad(x, (1, 1, 1, 1), value=-1.0)[..., 1 + dy:1 + dy + H, 1 + dx:1 + dx + W]
    return x


def diffusion_geometric(x: torch.Tensor, p: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image of a float batch (B, C, H, W), with probability p, gets one of the 71 non-identity transforms of
    GEOMETRIC, uniformly. Returns the images and the transform indices (B,) on x's device, 0 for untouched ones:
    the denoiser's augmentation label (model.augment_cond)."""
    B = len(x)
    on = torch.rand(B, generator=generator, device="cpu") < p
    index = torch.randint(1, len(GEOMETRIC), (B,), generator=generator, device="cpu") * on
    out = x.clone()
    for k in index.unique().tolist():
        if k:
            rows = (index == k).to(x.device)
            out[rows] = geometric_transform(x[rows], k)
    return out, index.to(x.device)
