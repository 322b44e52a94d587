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
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .config import POLICIES
from .data import to_float
from .errors import HybvitError



def draw_crop_flip(B: int, crop_padding: int, hflip: bool, generator: torch.Generator) -> dict:
    """The crop offsets (dy, dx) and flips of a batch of B images (None where the operation is off)."""
    dy = dx = flip = None
    if crop_padding > 0:
        dy = torch.randint(0, 2 * crop_padding + 1, (B,), generator=generator)
        dx = torch.randint(0, 2 * crop_padding + 1, (B,), generator=generator)
    if hflip:
        flip = torch.rand(B, generator=generator) < 0.5
    return {"padding": crop_padding, "dy": dy, "dx": dx, "flip": flip}


def apply_crop_flip(x: torch.Tensor, draw: dict, rows: torch.Tensor) -> torch.Tensor:
    """The drawn crop (black padding) and flip of batch rows `rows` (n,) on their images x (n, C, H, W): uint8 or
    float in [-1, 1]."""
    n, _, H, W = x.shape
    if draw["dy"] is not None:
        p = draw["padding"]
        black = 0 if x.dtype == torch.uint8 else -1.0  # pad with black, as RandomCrop does
        padded = F.pad(x, (p, p, p, p), value=black)
        rows_ = (draw["dy"][rows][:, None] + torch.arange(H)[None]).to(x.device)  # (n, H)
        cols = (draw["dx"][rows][:, None] + torch.arange(W)[None]).to(x.device)   # (n, W)
        b = torch.arange(n, device=x.device)[:, None, None]
        x = padded.permute(0, 2, 3, 1)[b, rows_[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    if draw["flip"] is not None:
        flip = draw["flip"][rows].to(x.device)
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x.contiguous()


def crop_flip(x: torch.Tensor, crop_padding: int, hflip: bool, generator: torch.Generator) -> torch.Tensor:
    """Per-sample random crop (black padding) and horizontal flip on a batch (B, C, H, W): uint8 or float in [-1, 1]."""
    return apply_crop_flip(x, draw_crop_flip(len(x), crop_padding, hflip, generator), torch.arange(len(x)))


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


def draw_auto_augment(B: int, H: int, W: int, name: str, generator: torch.Generator) -> list:
    """The operations of AutoAugment (policy `name`) or RandAugment (`rand`) for B images of H x W: a list of
    slots, each a list of B (operation, magnitude) pairs, None where the image skips that slot.

    AutoAugment picks one sub-policy per image and applies each of its two operations with that operation's
    probability and a random sign (rotations: counter-clockwise), as the paper's code (PAPER_FILL above);
    RandAugment, as torchvision, applies 2 operations drawn uniformly from 14, at magnitude bin 9 of 31, with a
    random sign."""
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
    drawn = []
    for slot in slots:  # operations in order: every image's first operation, then every image's second
        u = torch.rand(B, generator=generator).tolist()
        neg = (torch.rand(B, generator=generator) < 0.5).tolist()
        ops = []
        for b, (op, p, bin_) in enumerate(slot):
            if u[b] > p or op == "Identity":
                ops.append(None)
                continue
            m = None if bin_ is None else _SPACE[op][0](bin_ / (bins - 1), H, W)
            if _SPACE[op][1] and neg[b] and not (paper and op == "Rotate"):
                m = -m
            ops.append((op, m))
        drawn.append(ops)
    return drawn


def apply_auto_augment(x: torch.Tensor, drawn: list, rows: torch.Tensor, paper: bool) -> torch.Tensor:
    """The drawn operations of batch rows `rows` on their uint8 images x (n, C, H, W), grouped by operation and
    magnitude into one batched call each (paper: the paper code's fill and smooth shear, for AutoAugment)."""
    out = x.clone()
    rows = rows.tolist()
    for ops in drawn:
        groups: dict = {}
        for i, b in enumerate(rows):
            if ops[b] is not None:
                groups.setdefault(ops[b], []).append(i)
        _apply_groups(out, groups, paper)
    return out


def auto_augment_batched(x: torch.Tensor, name: str, generator: torch.Generator) -> torch.Tensor:
    """AutoAugment (policy `name`) or RandAugment (`rand`) drawn per image (draw_auto_augment), applied in batched
    groups."""
    B, _, H, W = x.shape
    return apply_auto_augment(x, draw_auto_augment(B, H, W, name, generator), torch.arange(B), name != "rand")


# Random erasing as the paper's code (utils/random_erasing.py): area U[0.02, 0.4] of the image, aspect ratio uniform
# (not log-uniform) in [0.3, 1/0.3], up to 100 tries for a box that fits, filled with 0.5 in [-1, 1] space.
ERASE_AREA, ERASE_RATIO, ERASE_TRIES, ERASE_FILL = (0.02, 0.4), (0.3, 1 / 0.3), 100, 0.5


def draw_erasing(B: int, H: int, W: int, p: float, generator: torch.Generator) -> dict:
    """The erasing boxes of B images of H x W: each image, with probability p, gets the first of ERASE_TRIES (area,
    aspect) draws whose box fits inside the image, at a uniform place; `ok` marks the images erased."""
    apply = torch.rand(B, generator=generator) < p
    lo, hi = ERASE_AREA
    area = H * W * (lo + (hi - lo) * torch.rand(B, ERASE_TRIES, generator=generator))
    ratio = ERASE_RATIO[0] + (ERASE_RATIO[1] - ERASE_RATIO[0]) * torch.rand(B, ERASE_TRIES, generator=generator)
    h = torch.sqrt(area * ratio).round().long()
    w = torch.sqrt(area / ratio).round().long()
    fits = (h < H) & (w < W)
    first = fits.float().argmax(1)                                  # the first attempt that fits
    h, w = h.gather(1, first[:, None])[:, 0], w.gather(1, first[:, None])[:, 0]
    top = (torch.rand(B, generator=generator) * (H - h + 1)).long()
    left = (torch.rand(B, generator=generator) * (W - w + 1)).long()
    return {"ok": apply & fits.any(1), "top": top, "left": left, "h": h, "w": w}


def apply_erasing(x: torch.Tensor, box: dict, rows: torch.Tensor) -> torch.Tensor:
    """The drawn boxes of batch rows `rows`, filled with ERASE_FILL in their float images x (n, C, H, W)."""
    H, W = x.shape[-2:]
    ok, top, left, h, w = (box[k][rows] for k in ("ok", "top", "left", "h", "w"))
    r, c = torch.arange(H)[None, :, None], torch.arange(W)[None, None, :]
    mask = ((r >= top[:, None, None]) & (r < (top + h)[:, None, None]) & (c >= left[:, None, None])
            & (c < (left + w)[:, None, None]) & ok[:, None, None])      # (n, H, W)
    return x.masked_fill(mask.to(x.device)[:, None], ERASE_FILL)


def random_erasing_batched(x: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Random erasing (Zhong et al., 2020) per image with probability p, as the paper's code, in one masked
    operation (draw_erasing)."""
    B, _, H, W = x.shape
    return apply_erasing(x, draw_erasing(B, H, W, p, generator), torch.arange(B))


def draw_mix(B: int, H: int, W: int, prob: float, alpha: float, generator: torch.Generator) -> dict:
    """CutMix or Mixup as the paper's code (utils/losses.py ce_loss, utils/mix.py): one draw per batch. With
    probability `prob` the whole batch is mixed with one permutation of itself (`partner`) and one lambda ~
    Beta(alpha, alpha), by CutMix (one box of side sqrt(1 - lambda) at a uniform centre, clipped; lambda then the
    unpasted share) or by Mixup, at even odds; otherwise it stays clean."""
    mixed, cutmix = (torch.rand(2, generator=generator) < torch.tensor([prob, 0.5])).tolist()
    partner = torch.randperm(B, generator=generator)
    rng = np.random.default_rng(int(torch.randint(0, 2 ** 62, (1,), generator=generator)))
    lam = float(rng.beta(alpha, alpha))
    cy, cx = (int(torch.randint(0, n, (1,), generator=generator)) for n in (H, W))
    box = None
    if cutmix:
        ch, cw = int(H * math.sqrt(1 - lam)) // 2, int(W * math.sqrt(1 - lam)) // 2
        box = max(cy - ch, 0), min(cy + ch, H), max(cx - cw, 0), min(cx + cw, W)
        lam = 1 - (box[1] - box[0]) * (box[3] - box[2]) / (H * W)
    return {"mixed": mixed, "partner": partner, "lam": lam, "box": box}


def apply_mix(x: torch.Tensor, other: torch.Tensor, onehot: torch.Tensor, other_onehot: torch.Tensor,
              draw: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Images x (n, C, H, W) mixed with their partners' `other` as drawn, and the soft targets
    lambda * onehot + (1 - lambda) * other_onehot: cross-entropy against them is the code's
    lambda CE(y_a) + (1 - lambda) CE(y_b), label smoothing included. A clean draw returns x and onehot."""
    if not draw["mixed"]:
        return x, onehot
    lam = draw["lam"]
    if draw["box"] is not None:
        y1, y2, x1, x2 = draw["box"]
        out = x.clone()
        out[:, :, y1:y2, x1:x2] = other[:, :, y1:y2, x1:x2]
    else:
        out = lam * x + (1 - lam) * other
    return out, lam * onehot + (1 - lam) * other_onehot


def mix(x: torch.Tensor, y: torch.Tensor, num_classes: int, prob: float, alpha: float,
        generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """draw_mix and apply_mix on a whole batch: the images and soft targets (B, num_classes)."""
    B, _, H, W = x.shape
    onehot = F.one_hot(y, num_classes).float()
    draw = draw_mix(B, H, W, prob, alpha, generator)
    partner = draw["partner"].to(x.device)
    return apply_mix(x, x[partner], onehot, onehot[partner], draw)


# -- the classification batch: every choice drawn for the whole batch, the image work done for some rows --------
# draw_classifier draws every random choice of a global batch (cheap numbers); apply_classifier does the image
# work for the rows one process keeps, plus their CutMix/Mixup partners (needed_rows). K processes' rows,
# concatenated, are bitwise the one-process batch on a CPU (tested): each operation works image by image. On a GPU a
# batched kernel (sharpness, contrast) may round differently for another batch size; not measured.

@dataclass
class ClassifierDraw:
    crop: dict
    autoaugment: list | None
    paper: bool                     # AutoAugment as the paper's code (else RandAugment as torchvision)
    erasing: dict | None
    mix: dict | None


def draw_classifier(B: int, shape: tuple, data_cfg, generator: torch.Generator) -> ClassifierDraw:
    """Every random choice of the augmentation of B images of shape (C, H, W), as data_cfg says."""
    C, H, W = shape
    crop = draw_crop_flip(B, data_cfg.crop_padding, data_cfg.hflip, generator)
    aa = None
    if data_cfg.autoaugment != "none":
        if C != 3:
            raise HybvitError("data.autoaugment needs RGB images; set data.autoaugment=none for this data")
        aa = draw_auto_augment(B, H, W, data_cfg.autoaugment, generator)
    erasing = draw_erasing(B, H, W, data_cfg.random_erasing, generator) if data_cfg.random_erasing > 0 else None
    mixing = draw_mix(B, H, W, data_cfg.mix_prob, 1.0, generator) if data_cfg.mix_prob > 0 else None  # Beta(1, 1)
    return ClassifierDraw(crop, aa, data_cfg.autoaugment != "rand", erasing, mixing)


def needed_rows(draw: ClassifierDraw, rows: torch.Tensor) -> torch.Tensor:
    """The batch rows whose images `rows` need (sorted): themselves, and their partners in a mixed batch."""
    if draw.mix is None or not draw.mix["mixed"]:
        return rows
    return torch.cat([rows, draw.mix["partner"][rows]]).unique()


def apply_classifier(draw: ClassifierDraw, x_uint8: torch.Tensor, need: torch.Tensor, y: torch.Tensor,
                     rows: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float images in [-1, 1] and targets of batch rows `rows`, from the uint8 images x_uint8 of the rows `need`
    (needed_rows) and the labels y of the whole batch; on the device that holds x_uint8."""
    x = apply_crop_flip(x_uint8, draw.crop, need)
    if draw.autoaugment is not None:
        x = apply_auto_augment(x, draw.autoaugment, need, draw.paper)
    x = to_float(x)
    if draw.erasing is not None:     # the code's erasing in both backends (torchvision's draws other boxes)
        x = apply_erasing(x, draw.erasing, need)
    at = torch.searchsorted(need, rows).to(x.device)                  # rows' places among the needed images
    own = x if torch.equal(need, rows) else x[at]
    if draw.mix is None:
        return own, y[rows.to(y.device)].to(x.device)
    onehot = F.one_hot(y, num_classes).float().to(x.device)
    partner = draw.mix["partner"][rows]
    other = x[torch.searchsorted(need, partner).to(x.device)] if draw.mix["mixed"] else own
    return apply_mix(own, other, onehot[rows.to(x.device)], onehot[partner.to(x.device)], draw.mix)


def classifier_batch(x_uint8: torch.Tensor, y: torch.Tensor, num_classes: int, data_cfg,
                     generator: torch.Generator, per_image: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (B, C, H, W) and labels -> float images in [-1, 1] and targets (labels, or soft labels when
    CutMix/Mixup is on), augmented as data_cfg says, on the device that holds x_uint8.

    per_image: torchvision's transforms applied image by image on the CPU (the reference, and what a CPU data
    loader would do) rather than grouped batched calls on any device."""
    rows = torch.arange(len(x_uint8))
    if not per_image:
        return apply_classifier(draw_classifier(len(x_uint8), tuple(x_uint8.shape[1:]), data_cfg, generator),
                                x_uint8, rows, y, rows, num_classes)
    x = crop_flip(x_uint8, data_cfg.crop_padding, data_cfg.hflip, generator)
    if data_cfg.autoaugment != "none":
        if x.shape[1] != 3:
            raise HybvitError("data.autoaugment needs RGB images; set data.autoaugment=none for this data")
        x = _per_image(_policy(data_cfg.autoaugment), x.cpu(), generator).to(x_uint8.device)
    x = to_float(x)
    if data_cfg.random_erasing > 0:
        x = random_erasing_batched(x, data_cfg.random_erasing, generator)
    if data_cfg.mix_prob > 0:
        return mix(x, y, num_classes, data_cfg.mix_prob, 1.0, generator)
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


def draw_geometric(B: int, p: float, generator: torch.Generator) -> torch.Tensor:
    """Each of B images, with probability p, gets one of the 71 non-identity transforms of GEOMETRIC, uniformly:
    the transform indices (B,) on the CPU, 0 for untouched ones (the denoiser's augmentation label,
    model.augment_cond)."""
    on = torch.rand(B, generator=generator, device="cpu") < p
    return torch.randint(1, len(GEOMETRIC), (B,), generator=generator, device="cpu") * on


def apply_geometric(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Transform GEOMETRIC[index[i]] of each float image x[i] (n, C, H, W)."""
    out = x.clone()
    for k in index.unique().tolist():
        if k:
            rows = (index == k).to(x.device)
            out[rows] = geometric_transform(x[rows], k)
    return out


def diffusion_geometric(x: torch.Tensor, p: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """draw_geometric and apply_geometric on a float batch (B, C, H, W): the images and the indices on x's
    device."""
    index = draw_geometric(len(x), p, generator)
    return apply_geometric(x, index), index.to(x.device)
