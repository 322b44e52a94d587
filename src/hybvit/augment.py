"""Augmentation of the classification batch, and optional non-leaking augmentation of the diffusion batch.

The paper never augments the diffusion batch (REFERENCE-NOTES); `diffusion_geometric` at the end is beyond it.

The official CIFAR recipe, in order: random crop with padding, horizontal flip, AutoAugment (CIFAR policy),
random erasing (p 0.25; the code's area, aspect and fill), then for half of the batches CutMix (beta 1) or Mixup
(alpha 1) of the whole batch with soft labels; label smoothing 0.1 is applied in the loss. Every random choice is
drawn from the step's generator, so a resumed run sees the same augmentations as an uninterrupted one. AutoAugment
and RandAugment come from torchvision.transforms.v2: by default their functional operations run on batches grouped
by the operation each image drew (fast on the CPU, and on a GPU the augmentation never leaves the device);
`classifier_batch(..., per_image=True)` applies the transform objects image by image on the CPU instead (a
transform called on a batch would draw one choice for all images): the reference the tests compare with.
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
    return v2.AutoAugment(getattr(v2.AutoAugmentPolicy, key), fill=PAPER_FILL)   # torchvision's other choices


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


# AutoAugment as the paper's code ran it (its utils/autoaug.py, DeepVoltaire's PIL version): grey fill 128 where a
# geometric operation uncovers the border, smooth shears (PIL's bicubic; bilinear here, the smooth mode affine
# offers on tensors), rotations always counter-clockwise, and solarize thresholds from 256 (no pixel) down. RandAugment (beyond the paper) keeps torchvision's definition: fill 0,
# nearest, a random sign for rotations, thresholds from 255.
PAPER_FILL = 128


def _apply(x: torch.Tensor, op: str, m, paper: bool = False) -> torch.Tensor:
    """One operation with one magnitude on a uint8 batch (B, C, H, W): torchvision's (nearest, fill 0), or with
    paper=True the paper code's fill and a smooth shear."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF
    fill = [float(PAPER_FILL)] * x.shape[1] if paper else None
    if op == "Identity":
        return x
    if op in ("ShearX", "ShearY"):
        shear = [math.degrees(math.atan(m)), 0.0] if op == "ShearX" else [0.0, math.degrees(math.atan(m))]
        how = InterpolationMode.BILINEAR if paper else InterpolationMode.NEAREST   # tensors: no bicubic
        return TF.affine(x, angle=0.0, translate=[0, 0], scale=1.0, shear=shear, center=[0, 0],
                         interpolation=how, fill=fill)
    if op in ("TranslateX", "TranslateY"):
        shift = [int(m), 0] if op == "TranslateX" else [0, int(m)]
        return TF.affine(x, angle=0.0, translate=shift, scale=1.0, shear=[0.0, 0.0], fill=fill)
    if op == "Rotate":
        return TF.rotate(x, angle=m, fill=fill)
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
        threshold = (256.0 if paper else 255.0) * m
        return x if threshold > 255 else TF.solarize(x, threshold=threshold)
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
                          "install torchvision >= 0.18")
    return table


def _apply_groups(x: torch.Tensor, groups: dict, paper: bool = False) -> None:
    """groups: {(op, magnitude): [image indices]}; applies each group's operation in place, one batched call each."""
    for (op, m), rows in groups.items():
        i = torch.tensor(rows, device=x.device)
        x[i] = _apply(x[i], op, m, paper)


def auto_augment_batched(x: torch.Tensor, name: str, generator: torch.Generator) -> torch.Tensor:
    """AutoAugment (policy `name`) or RandAugment (`rand`) drawn per image, applied in batched groups.

    AutoAugment picks one sub-policy per image and applies each of its two operations with that operation's
    probability and a random sign (rotations: counter-clockwise), as the paper's code (PAPER_FILL above);
    RandAugment, as torchvision, applies 2 operations drawn uniformly from 14, at magnitude bin 9 of 31, with a
    random sign."""
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
    paper = name != "rand"
    for slot in slots:  # operations in order: every image's first operation, then every image's second
        u = torch.rand(B, generator=generator).tolist()
        neg = (torch.rand(B, generator=generator) < 0.5).tolist()
        groups: dict = {}
        for b, (op, p, bin_) in enumerate(slot):
            if u[b] > p or op == "Identity":
                continue
            m = None if bin_ is None else _SPACE[op][0](bin_ / (bins - 1), H, W)
            if _SPACE[op][1] and neg[b] and not (paper and op == "Rotate"):
                m = -m
            groups.setdefault((op, m), []).append(b)
        _apply_groups(out, groups, paper)
    return out


# Random erasing as the paper's code (utils/random_erasing.py): area U[0.02, 0.4] of the image, aspect ratio uniform
# (not log-uniform) in [0.3, 1/0.3], up to 100 tries for a box that fits, filled with 0.5 in [-1, 1] space.
ERASE_AREA, ERASE_RATIO, ERASE_TRIES, ERASE_FILL = (0.02, 0.4), (0.3, 1 / 0.3), 100, 0.5


def random_erasing_batched(x: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Random erasing (Zhong et al., 2020) per image with probability p, as the paper's code, in one masked
    operation: the first of ERASE_TRIES (area, aspect) draws whose box fits inside the image, at a uniform place."""
    B, _, H, W = x.shape
    apply = torch.rand(B, generator=generator) < p
    lo, hi = ERASE_AREA
    area = H * W * (lo + (hi - lo) * torch.rand(B, ERASE_TRIES, generator=generator))
    ratio = ERASE_RATIO[0] + (ERASE_RATIO[1] - ERASE_RATIO[0]) * torch.rand(B, ERASE_TRIES, generator=generator)
    h = torch.sqrt(area * ratio).round().long()
    w = torch.sqrt(area / ratio).round().long()
    fits = (h < H) & (w < W)
    first = fits.float().argmax(1)                                  # the first attempt that fits
    ok = apply & fits.any(1)
    h, w = h.gather(1, first[:, None])[:, 0], w.gather(1, first[:, None])[:, 0]
    top = (torch.rand(B, generator=generator) * (H - h + 1)).long()
    left = (torch.rand(B, generator=generator) * (W - w + 1)).long()
    rows, cols = torch.arange(H)[None, :, None], torch.arange(W)[None, None, :]
    box = ((rows >= top[:, None, None]) & (rows < (top + h)[:, None, None]) & (cols >= left[:, None, None])
           & (cols < (left + w)[:, None, None]) & ok[:, None, None])      # (B, H, W)
    return x.masked_fill(box.to(x.device)[:, None], ERASE_FILL)


def mix(x: torch.Tensor, y: torch.Tensor, num_classes: int, prob: float, alpha: float,
        generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """CutMix or Mixup as the paper's code (utils/losses.py ce_loss, utils/mix.py): one draw per batch. With
    probability `prob` the whole batch is mixed with one permutation of itself and one lambda ~ Beta(alpha, alpha),
    by CutMix (one box of side sqrt(1 - lambda) at a uniform centre, clipped; lambda then the unpasted share) or by
    Mixup, at even odds; otherwise it is returned clean. Returns the images and soft targets (B, num_classes)
    lambda * onehot(y) + (1 - lambda) * onehot(y[perm]): cross-entropy against them is the code's
    lambda CE(y_a) + (1 - lambda) CE(y_b), label smoothing included."""
    B, _, H, W = x.shape
    onehot = F.one_hot(y, num_classes).float()
    mixed, cutmix = (torch.rand(2, generator=generator) < torch.tensor([prob, 0.5])).tolist()
    partner = torch.randperm(B, generator=generator).to(x.device)
    rng = np.random.default_rng(int(torch.randint(0, 2 ** 62, (1,), generator=generator)))
    lam = float(rng.beta(alpha, alpha))
    cy, cx = (int(torch.randint(0, n, (1,), generator=generator)) for n in (H, W))
    if not mixed:
        return x, onehot
    other = x[partner]
    if cutmix:
        ch, cw = int(H * math.sqrt(1 - lam)) // 2, int(W * math.sqrt(1 - lam)) // 2
        y1, y2, x1, x2 = max(cy - ch, 0), min(cy + ch, H), max(cx - cw, 0), min(cx + cw, W)
        out = x.clone()
        out[:, :, y1:y2, x1:x2] = other[:, :, y1:y2, x1:x2]
        lam = 1 - (y2 - y1) * (x2 - x1) / (H * W)
    else:
        out = lam * x + (1 - lam) * other
    return out, lam * onehot + (1 - lam) * onehot[partner]


def classifier_batch(x_uint8: torch.Tensor, y: torch.Tensor, num_classes: int, data_cfg,
                     generator: torch.Generator, per_image: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (B, C, H, W) and labels -> float images in [-1, 1] and targets (labels, or soft labels when
    CutMix/Mixup is on), augmented as data_cfg says, on the device that holds x_uint8.

    per_image: torchvision's transforms applied image by image on the CPU (the reference, and what a CPU data
    loader would do) rather than grouped batched calls on any device."""
    x = crop_flip(x_uint8, data_cfg.crop_padding, data_cfg.hflip, generator)
    if data_cfg.autoaugment != "none":
        if x.shape[1] != 3:
            raise HybvitError("data.autoaugment needs RGB images; set data.autoaugment=none for this data")
        if per_image:
            x = _per_image(_policy(data_cfg.autoaugment), x.cpu(), generator).to(x_uint8.device)
        else:
            x = auto_augment_batched(x, data_cfg.autoaugment, generator)
    x = to_float(x)
    if data_cfg.random_erasing > 0:          # the code's erasing in both backends (torchvision's draws other boxes)
        x = random_erasing_batched(x, data_cfg.random_erasing, generator)
    if data_cfg.mix_prob > 0:
        return mix(x, y, num_classes, data_cfg.mix_prob, 1.0, generator)        # Beta(1, 1): the paper's code
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
