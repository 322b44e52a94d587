"""Datasets, held in memory as uint8 tensors, and the batch pipeline (sampling, augmentation, scaling).

Data specs (``--data``):
  digits          scikit-learn's bundled 8x8 digits, a fixed stratified 80/20 split (the default)
  npz:PATH        arrays x_train, y_train, x_test, y_test (Keras convention); uint8 (N,H,W) or (N,H,W,C)
  folder:PATH     PATH/train/<class>/* and PATH/test/<class>/*, any image format PIL reads
  cifar10[:ROOT], cifar100, svhn, stl10, tiny-imagenet, imagenet32
                  the standard datasets in their published formats (datasets.py; downloaded when possible)

Every dataset becomes ``ImageData``: uint8 tensors (N, C, H, W) and int64 labels. Images reach the model in
[-1, 1]. Batches are drawn by index from a per-step seeded generator, so training order is a pure function of
(seed, step) and a resumed run sees exactly the batches an uninterrupted one would.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .datasets import READERS
from .errors import HybvitError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


@dataclass
class ImageData:
    x_train: torch.Tensor  # (N, C, H, W) uint8
    y_train: torch.Tensor  # (N,) int64
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    name: str
    classes: list[str] | None = None

    @property
    def image_size(self) -> int:
        return self.x_train.shape[-1]

    @property
    def channels(self) -> int:
        return self.x_train.shape[1]

    def describe(self) -> str:
        return (f"{self.name}: {len(self.x_train)} train / {len(self.x_test)} test images, "
                f"{self.image_size}x{self.image_size}x{self.channels}, {self.num_classes} classes")


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]."""
    return x.float().div_(127.5).sub_(1.0)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255], rounded to nearest (not truncated)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


# ----------------------------------------------------------------------------- loaders

def load_data(spec: str, image_size: int = 0) -> ImageData:
    """Parse a data spec and load it; every problem raises HybvitError with a one-line message."""
    kind, _, arg = spec.partition(":")
    if kind == "digits" and not arg:
        data = load_digits()
    elif kind == "npz":
        data = load_npz(_existing(arg, spec))
    elif kind == "folder":
        data = load_folder(_existing(arg, spec), image_size)
    elif kind in READERS:
        x_tr, y_tr, x_te, y_te, classes = READERS[kind](Path(arg or default_root()).expanduser())
        data = ImageData(x_tr, y_tr, x_te, y_te, classes, kind)
    else:
        raise HybvitError(f"unknown data spec '{spec}'; use digits, npz:PATH, folder:PATH or one of "
                          f"{', '.join(f'{k}[:ROOT]' for k in READERS)}")
    if image_size and data.image_size != image_size:
        data.x_train = resize(data.x_train, image_size)
        data.x_test = resize(data.x_test, image_size)
    _check_labels(data)
    return data


def default_root() -> str:
    return os.environ.get("HYBVIT_DATA", os.path.join(os.path.expanduser("~"), ".cache", "hybvit", "data"))


def _existing(path: str, spec: str) -> Path:
    if not path:
        raise HybvitError(f"data spec '{spec}' needs a path, e.g. {spec.rstrip(':')}:/path/to/data")
    p = Path(path).expanduser()
    if not p.exists():
        raise HybvitError(f"data path '{p}' does not exist; check the path given to --data")
    return p


def _check_labels(data: ImageData) -> None:
    for split, y in (("train", data.y_train), ("test", data.y_test)):
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= data.num_classes):
            raise HybvitError(
                f"{data.name}: {split} labels must lie in [0, {data.num_classes - 1}] but range over "
                f"[{int(y.min())}, {int(y.max())}]; relabel the classes as 0..K-1")
    if len(data.x_train) == 0:
        raise HybvitError(f"{data.name}: the training set is empty")


def load_digits() -> ImageData:
    """scikit-learn's 1797 8x8 digits (values 0..16, rescaled to 0..255); stratified 80/20 split, seed 0."""
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    d = sk_digits()
    x = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # (1797, 1, 8, 8)
    x_tr, x_te, y_tr, y_te = train_test_split(x, d.target, test_size=0.2, stratify=d.target, random_state=0)
    return ImageData(torch.from_numpy(x_tr), torch.from_numpy(y_tr).long(), torch.from_numpy(x_te),
                     torch.from_numpy(y_te).long(), 10, "digits", [str(i) for i in range(10)])


def load_npz(path: Path) -> ImageData:
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as e:  # noqa: BLE001 - any read failure is a bad file
        raise HybvitError(f"cannot read npz file '{path}' ({type(e).__name__}: {e}); "
                          f"save it with numpy.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)")
    missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in arrays]
    if missing:
        raise HybvitError(f"npz file '{path}' lacks the arrays {', '.join(missing)} (it has "
                          f"{', '.join(sorted(arrays)) or 'none'}); it needs x_train, y_train, x_test, y_test")
    xs, ys = [], []
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim == 3:
            x = x[..., None]
        if x.ndim != 4 or x.shape[1] != x.shape[2] or x.shape[3] not in (1, 3, 4):
            raise HybvitError(f"npz x_{split} has shape {arrays[f'x_{split}'].shape}; expected uint8 (N,H,W) "
                              f"or (N,H,W,C) with square images and C in 1, 3, 4")
        if x.dtype != np.uint8:
            raise HybvitError(f"npz x_{split} has dtype {x.dtype}; expected uint8 in [0, 255] "
                              f"(convert with (x * 255).round().astype(np.uint8) for [0, 1] floats)")
        y = np.asarray(y).reshape(-1)
        if y.shape[0] != x.shape[0]:
            raise HybvitError(f"npz y_{split} has {y.shape[0]} labels for {x.shape[0]} images; they must match")
        if not np.issubdtype(y.dtype, np.integer):
            raise HybvitError(f"npz y_{split} has dtype {y.dtype}; labels must be integers 0..K-1")
        xs.append(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))))
        ys.append(torch.from_numpy(y.astype(np.int64)))
    if xs[0].shape[1:] != xs[1].shape[1:]:
        raise HybvitError(f"npz x_train images are {tuple(xs[0].shape[1:])} but x_test are "
                          f"{tuple(xs[1].shape[1:])} (C,H,W); they must match")
    num_classes = int(ys[0].max()) + 1 if len(ys[0]) else 0
    return ImageData(xs[0], ys[0], xs[1], ys[1], num_classes, f"npz:{path}")


def load_folder(root: Path, image_size: int = 0) -> ImageData:
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise HybvitError(f"folder data '{root}' has no '{split}/' folder; expected "
                              f"{root}/train/<class>/* and {root}/test/<class>/*")
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    if not classes:
        raise HybvitError(f"'{root}/train' has no class folders; put images in {root}/train/<class>/")
    index = {c: i for i, c in enumerate(classes)}
    extra = sorted(p.name for p in (root / "test").iterdir() if p.is_dir() and p.name not in index)
    if extra:
        raise HybvitError(f"'{root}/test' has classes not in train: {', '.join(extra[:5])}; "
                          f"use the same class folders in both")

    files = {split: [(f, index[c]) for c in classes if (root / split / c).is_dir()
                     for f in sorted((root / split / c).iterdir()) if f.suffix.lower() in IMAGE_EXTENSIONS]
             for split in ("train", "test")}
    first = files["train"][0][0] if files["train"] else None
    if first is None:
        raise HybvitError(f"no images found under '{root}/train/<class>/'")
    from PIL import Image
    with Image.open(first) as im:
        mode = "L" if im.mode in ("L", "1", "I;16", "I") else "RGB"
        size = image_size or im.size[0]

    x_tr, y_tr = load_image_files(files["train"], size, mode, resize=bool(image_size), reference=first)
    if not files["test"]:
        raise HybvitError(f"no images found under '{root}/test/<class>/'")
    x_te, y_te = load_image_files(files["test"], size, mode, resize=bool(image_size), reference=first)
    return ImageData(x_tr, y_tr, x_te, y_te, len(classes), f"folder:{root}", classes)


def load_image_files(items: list[tuple[Path, int]], size: int, mode: str = "RGB", resize: bool = True,
                     reference: Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode (path, label) pairs into uint8 (N, C, H, W) and int64 labels. Images of another size are resized
    (bicubic) when resize is True, else refused; a file PIL cannot read is named in the error."""
    from PIL import Image, UnidentifiedImageError

    arr = np.empty((len(items), size, size, 1 if mode == "L" else 3), dtype=np.uint8)
    bar = None
    if len(items) > 5000:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(items), desc="reading images", unit="img", mininterval=1.0, leave=False)
    try:
        for n, (f, _) in enumerate(items):
            if bar is not None:
                bar.update(1)
            try:
                with Image.open(f) as im:
                    im = im.convert(mode)
                    if im.size != (size, size):
                        if not resize:
                            raise HybvitError(
                                f"image '{f}' is {im.size[0]}x{im.size[1]} but '{reference}' is {size}x{size}; "
                                f"resize them all with --set data.image_size=N")
                        im = im.resize((size, size), Image.BICUBIC)
                    arr[n] = np.asarray(im).reshape(size, size, -1)
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
                raise HybvitError(f"cannot read image '{f}' ({type(e).__name__}); remove or replace the file")
    finally:
        if bar is not None:
            bar.close()
    labels = torch.tensor([c for _, c in items], dtype=torch.long)
    return torch.from_numpy(arr.transpose(0, 3, 1, 2).copy()), labels


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    y = F.interpolate(x.float(), size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return y.round().clamp(0, 255).to(torch.uint8)


# ----------------------------------------------------------------------------- batches

class Batches:
    """Index batches as a pure function of (seed, stream, step): epoch e uses permutation randperm(seed, e).

    repeats > 1 is repeated augmentation (Hoffer et al., 2020): each batch holds batch_size // repeats distinct
    images, each `repeats` times in a row (they are then augmented independently)."""

    def __init__(self, n: int, batch_size: int, seed: int, stream: int, repeats: int = 1):
        batch_size = min(batch_size, n * repeats)
        self.n, self.batch_size, self.seed, self.stream, self.repeats = n, batch_size, seed, stream, repeats
        self.unique = max(1, batch_size // repeats)
        self.per_epoch = max(1, n // self.unique)
        self._cache: tuple[int, torch.Tensor] | None = None

    def indices(self, step: int) -> torch.Tensor:
        epoch, k = divmod(step, self.per_epoch)
        if self._cache is None or self._cache[0] != epoch:
            g = torch.Generator().manual_seed(_mix(self.seed, self.stream, epoch))
            self._cache = (epoch, torch.randperm(self.n, generator=g))
        idx = self._cache[1][k * self.unique:(k + 1) * self.unique]
        return idx.repeat_interleave(self.repeats)[:self.batch_size] if self.repeats > 1 else idx


def _mix(*xs: int) -> int:
    """A deterministic 63-bit seed from a few integers (SplitMix-style)."""
    h = 0x9E3779B97F4A7C15
    for x in xs:
        h = (h ^ (x + 0x9E3779B97F4A7C15 + (h << 6) + (h >> 2))) & 0xFFFFFFFFFFFFFFFF
        h = (h * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    return h >> 1


def step_generator(seed: int, step: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(_mix(seed, 1000 + stream, step))


def augment(x: torch.Tensor, crop_padding: int, hflip: bool, generator: torch.Generator) -> torch.Tensor:
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
