"""Images in memory and the seeded batch order.

Every dataset becomes ``ImageData``: uint8 tensors (N, C, H, W) and int64 labels (datasets.py reads them). Images
reach the model in [-1, 1]. Batches are drawn by index from a per-step seeded generator, so training order is a
pure function of (seed, step) and a resumed run sees exactly the batches an uninterrupted one would.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import HybvitError


@dataclass
class ImageData:
    x_train: torch.Tensor  # (N, C, H, W) uint8
    y_train: torch.Tensor  # (N,) int64
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    name: str
    classes: list[str] | None = None
    mapped: bool = False   # the arrays are read-only maps of a prepared folder's files (shared page cache)

    @property
    def image_size(self) -> int:
        return self.x_train.shape[-1]

    @property
    def channels(self) -> int:
        return self.x_train.shape[1]

    def describe(self) -> str:
        return (f"{self.name}: {len(self.x_train)} train / {len(self.x_test)} test images, "
                f"{self.image_size}x{self.image_size}x{self.channels}, {self.num_classes} classes")


def cache_dir() -> Path:
    """Where hybvit keeps what it can recompute: $HYBVIT_CACHE, default ~/.cache/hybvit."""
    return Path(os.environ.get("HYBVIT_CACHE", Path.home() / ".cache" / "hybvit"))


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]."""
    return x.float().div_(127.5).sub_(1.0)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255], rounded to nearest (not truncated)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


# ----------------------------------------------------------------------------- batches

class Batches:
    """Index batches as a pure function of (seed, stream, step): epoch e uses permutation randperm(seed, e), and
    its k-th batch is the k-th slice of batch_size indices (at most n: a batch never holds an image twice)."""

    def __init__(self, n: int, batch_size: int, seed: int, stream: int):
        self.n, self.batch_size, self.seed, self.stream = n, min(batch_size, n), seed, stream
        self.per_epoch = max(1, n // self.batch_size)
        self._cache: tuple[int, torch.Tensor] | None = None

    def indices(self, step: int) -> torch.Tensor:
        epoch, k = divmod(step, self.per_epoch)
        if self._cache is None or self._cache[0] != epoch:
            g = torch.Generator().manual_seed(_mix(self.seed, self.stream, epoch))
            self._cache = (epoch, torch.randperm(self.n, generator=g))
        return self._cache[1][k * self.batch_size:(k + 1) * self.batch_size]


def check_batch_split(cfg, n_train: int, world: int = 1) -> None:
    """train.batch_size is the global batch of each branch; it must split evenly into world processes x
    train.grad_accum micro-batches (after the cap at the training-set size that Batches applies)."""
    opts = cfg.train
    parts = world * opts.grad_accum
    b = Batches(n_train, opts.batch_size, opts.seed, 0).batch_size
    if b % parts:
        capped = "" if b == opts.batch_size else f" (train.batch_size {opts.batch_size} capped at the training set)"
        raise HybvitError(f"the global batch of {b} images{capped} does not split into {world} process(es) x "
                          f"train.grad_accum {opts.grad_accum}; use a multiple of {parts}, e.g. "
                          f"--set train.batch_size={max(parts, round(b / parts) * parts)}")


def _mix(*xs: int) -> int:
    """A deterministic 63-bit seed from a few integers (SplitMix-style)."""
    h = 0x9E3779B97F4A7C15
    for x in xs:
        h = (h ^ (x + 0x9E3779B97F4A7C15 + (h << 6) + (h >> 2))) & 0xFFFFFFFFFFFFFFFF
        h = (h * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    return h >> 1


def step_generator(seed: int, step: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(_mix(seed, 1000 + stream, step))
