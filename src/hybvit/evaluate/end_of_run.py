"""What `hybvit train` measures: while it trains (train.eval_every: test accuracy and small-fd) and when the run
ends (test accuracy of the EMA and raw weights, samples.png and the optional pixel-space Frechet distance, sized to
fit the run). The run's own samples are always DDIM with 50 steps from the EMA weights: a preview and a check;
`hybvit evaluate` measures with any sampler."""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..config import Config
from ..data import ImageData
from ..diffusion import GaussianDiffusion
from ..data import to_uint8
from ..model import ViT
from ..sample import draw_samples, make_grid, save_png
from .accuracy import accuracy
from .fid import SmallFeatures, extract, frechet_to_reference, reference_stats
from .frechet import pixel_frechet_distance


SAMPLER, SAMPLE_STEPS = "ddim", 50        # the run's own samples (samples.png, pixel-FD, small-fd while training)
PNG_SAMPLES = 100                         # samples.png: a 10 x 10 grid
EVAL_SAMPLES = 1000                       # small-fd while training (train.eval_every)
EVAL_BATCH = 500                          # images per forward pass when evaluating


def sampler_label(sampler: str, steps: int) -> str:
    """How a report names a sampler: "ancestral" (all T steps), else "<sampler>-<network evaluations>"."""
    return "ancestral" if sampler == "ancestral" else f"{sampler}-{steps}"


@torch.no_grad()
def log_samples(writer, model: ViT, diffusion: GaussianDiffusion, cfg: Config, device, step: int, n: int,
                amp: str) -> None:
    """A grid of n EMA samples to TensorBoard (at each train.eval_every)."""
    x = draw_samples(model, diffusion, n, sampler=SAMPLER, steps=SAMPLE_STEPS,
                     seed=cfg.train.seed, device=device, amp=amp)
    writer.add_image("samples", make_grid(x).permute(2, 0, 1), step)


class PeriodicEval:
    """train.eval_every: test accuracy of the raw and EMA weights, and EVAL_SAMPLES EMA samples scored by small-fd
    against the training set's cached statistics (FID belongs to `hybvit evaluate`, on checkpoints kept with
    train.keep_every). The global RNG is left as it was, so a run with evaluations trains exactly as one without."""

    def __init__(self, cfg: Config, data: ImageData, diffusion: GaussianDiffusion, device, amp: str):
        self.cfg, self.data, self.diffusion, self.device, self.amp = cfg, data, diffusion, device, amp
        self.extractor, self.ref = None, None

    def __call__(self, model: ViT, ema_model: ViT) -> dict[str, float]:
        t, out = self.cfg.train, {}
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            if t.mode != "genvit":
                out["eval/test_accuracy"] = accuracy(ema_model, self.data.x_test, self.data.y_test,
                                                     EVAL_BATCH, self.amp)
                out["eval/test_accuracy_raw"] = accuracy(model, self.data.x_test, self.data.y_test,
                                                         EVAL_BATCH, self.amp)
            if t.mode != "vit":
                if self.extractor is None:
                    self.extractor = SmallFeatures()
                    self.ref = reference_stats(self.extractor, self.data, self.device)
                x = draw_samples(ema_model, self.diffusion, EVAL_SAMPLES, sampler=SAMPLER, steps=SAMPLE_STEPS,
                                 seed=t.seed, device=self.device, amp=self.amp, batch_size=EVAL_BATCH)
                out["eval/small_fd"] = frechet_to_reference(extract(self.extractor, to_uint8(x), self.device),
                                                            self.ref)
        return out

    def run(self, model: ViT, ema_model: ViT, step: int, log) -> None:
        """Evaluate and log to TensorBoard, log.jsonl and a line above the progress bar."""
        values = self(model, ema_model)
        log.scalars(values, step)
        log.write(f"step {step}: " + ", ".join(f"{k.split('/')[1]} {v:.4f}" for k, v in values.items()))


def fits(n: int, steps: int, train_images_per_second: float | None, train_seconds: float | None) -> int:
    """How many of n samples the end of a run draws: all, unless their cost (steps forward passes each, a third of
    a training image's forward + backward) would exceed max(60 s, a quarter of the training time); then as many as
    fit. Without training figures (None): all."""
    if not train_images_per_second or train_seconds is None:
        return n
    per_sample = steps / (3 * train_images_per_second)            # seconds
    allowed = max(60.0, 0.25 * train_seconds)
    return n if n * per_sample <= allowed else int(allowed / per_sample)


def finish(cfg: Config, data: ImageData, model: ViT, ema_model: ViT, diffusion: GaussianDiffusion, out_dir: Path,
           writer, device, amp: str, log: Callable[[dict[str, float]], None] | None = None, progress: bool = False,
           train_images_per_second: float | None = None, train_seconds: float | None = None) -> dict[str, Any]:
    """End-of-run evaluation: test accuracy (EMA and raw weights), samples.png and the optional pixel-FD. The
    sampling fits the run (see `fits`): a pixel-FD that does not is skipped, and samples.png gets fewer images,
    each with a note."""
    t = cfg.train
    metrics: dict[str, Any] = {}
    if t.mode in ("vit", "hybvit"):
        bar = (lambda which: f"test accuracy ({which})") if progress else (lambda which: None)   # noqa: E731
        metrics["test_accuracy"] = accuracy(ema_model, data.x_test, data.y_test, EVAL_BATCH, amp, bar("EMA"))
        metrics["test_accuracy_raw"] = accuracy(model, data.x_test, data.y_test, EVAL_BATCH, amp, bar("raw"))
        if log is not None:
            log({"test/accuracy": metrics["test_accuracy"], "test/accuracy_raw": metrics["test_accuracy_raw"]})
        print(f"test accuracy: {metrics['test_accuracy']:.4f} (EMA), {metrics['test_accuracy_raw']:.4f} (raw)")
    steps = SAMPLE_STEPS
    n_fd, n_png = t.fd_samples, PNG_SAMPLES
    room = fits(max(n_fd, n_png), steps, train_images_per_second, train_seconds)
    if t.mode in ("genvit", "hybvit") and max(n_fd, n_png) > room:
        notes = []
        if n_fd:
            notes.append(f"pixel-FD of {n_fd} samples skipped")
            n_fd = 0
        if n_png > room:
            notes.append(f"samples.png holds {max(room, 1)} images, not {n_png}")
            n_png = max(room, 1)
        metrics["notes"] = [f"{' and '.join(notes)}: drawing them would take longer than the end of a "
                            f"{train_seconds:.0f}-second run should; run `hybvit sample` or `hybvit evaluate` "
                            f"for them"]
        print(f"note: {metrics['notes'][0]}")
    n = max(n_png, n_fd)
    if t.mode in ("genvit", "hybvit"):
        t0 = time.time()
        x = draw_samples(ema_model, diffusion, n, sampler=SAMPLER, steps=SAMPLE_STEPS, seed=t.seed,
                         device=device, amp=amp, batch_size=EVAL_BATCH, progress=progress)
        metrics["sampling_images_per_second"] = round(n / (time.time() - t0), 1)
        if n_png:
            grid = make_grid(x[:n_png])
            save_png(out_dir / "samples.png", grid)
            writer.add_image("samples", grid.permute(2, 0, 1), 0)
        if n_fd:
            fd = pixel_frechet_distance(x[:n_fd], data.x_test)
            metrics["pixel_fd"] = round(fd, 4)
            metrics["pixel_fd_samples"] = n_fd
            metrics["pixel_fd_sampler"] = sampler_label(SAMPLER, SAMPLE_STEPS)
            print(f"pixel-space Frechet distance ({n_fd} samples vs test set): {fd:.3f}")
    return metrics
