"""What `hybvit train` measures when a run ends: test accuracy (EMA and raw weights), samples.png and the
optional pixel-space Frechet distance; and the sample grids logged to TensorBoard while it trains."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from ..config import Config
from ..data import ImageData
from ..diffusion import GaussianDiffusion
from ..model import ViT
from ..sample import draw_samples, make_grid, save_png
from .accuracy import accuracy
from .frechet import pixel_frechet_distance


def sampler_label(sampler: str, steps: int) -> str:
    """How a report names a sampler: "ancestral" (all T steps), else "<sampler>-<network evaluations>"."""
    return "ancestral" if sampler == "ancestral" else f"{sampler}-{steps}"


@torch.no_grad()
def log_samples(writer, model: ViT, diffusion: GaussianDiffusion, cfg: Config, device, step: int, n: int,
                amp: str) -> None:
    """A grid of n EMA samples to TensorBoard (train.sample_every)."""
    x = draw_samples(model, diffusion, n, sampler=cfg.train.sampler, steps=cfg.train.sample_steps,
                     seed=cfg.train.seed, device=device, amp=amp)
    writer.add_image("samples", make_grid(x).permute(2, 0, 1), step)


def finish(cfg: Config, data: ImageData, model: ViT, ema_model: ViT, diffusion: GaussianDiffusion, out_dir: Path,
           writer, device, amp: str) -> dict[str, Any]:
    """End-of-run evaluation: test accuracy (EMA and raw weights), samples.png and the optional pixel-FD."""
    t = cfg.train
    metrics: dict[str, Any] = {}
    if t.mode in ("vit", "hybvit"):
        metrics["test_accuracy"] = accuracy(ema_model, data.x_test, data.y_test, t.eval_batch_size, amp)
        metrics["test_accuracy_raw"] = accuracy(model, data.x_test, data.y_test, t.eval_batch_size, amp)
        writer.add_scalar("test/accuracy", metrics["test_accuracy"], 0)
        print(f"test accuracy: {metrics['test_accuracy']:.4f} (EMA), {metrics['test_accuracy_raw']:.4f} (raw)")
    n = max(t.num_samples, t.fd_samples)
    if t.mode in ("genvit", "hybvit") and n > 0:                      # num_samples = fd_samples = 0: no sampling
        t0 = time.time()
        x = draw_samples(ema_model, diffusion, n, sampler=t.sampler, steps=t.sample_steps, seed=t.seed,
                         device=device, amp=amp, batch_size=t.eval_batch_size)
        metrics["sampling_images_per_second"] = round(n / (time.time() - t0), 1)
        if t.num_samples:
            grid = make_grid(x[:t.num_samples])
            save_png(out_dir / "samples.png", grid)
            writer.add_image("samples", grid.permute(2, 0, 1), 0)
        if t.fd_samples:
            fd = pixel_frechet_distance(x[:t.fd_samples], data.x_test)
            metrics["pixel_fd"] = round(fd, 4)
            metrics["pixel_fd_samples"] = t.fd_samples
            metrics["pixel_fd_sampler"] = sampler_label(t.sampler, t.sample_steps)
            print(f"pixel-space Frechet distance ({t.fd_samples} samples vs test set): {fd:.3f}")
    return metrics
