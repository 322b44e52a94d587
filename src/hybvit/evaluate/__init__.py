"""`hybvit evaluate`: one module per metric family; this file dispatches and writes the JSON report.

Metrics now: accuracy, pixel-fd. More (fid, is, bpd, ece, ood, pgd) come with the evaluation suite.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ..errors import HybvitError

METRICS = ("accuracy", "pixel-fd")


def parse_metrics(text: str) -> list[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in METRICS]
    if unknown or not names:
        raise HybvitError(f"unknown metric(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(METRICS)}")
    return names


def evaluate_run(run_dir: Path, metrics: list[str], data_spec: str | None = None, num_samples: int = 1000,
                 sampler: str = "ddim", steps: int = 50, seed: int = 0, batch_size: int = 500,
                 device: str = "auto") -> dict[str, Any]:
    from ..checkpoint import load_training_state
    from ..data import load_data
    from ..model import ViT
    from ..sample import load_run

    run = load_run(run_dir, device=device)
    cfg = run.config
    data = load_data(data_spec or cfg.data.spec, cfg.data.image_size)
    if (data.channels, data.image_size) != (cfg.model.channels, cfg.model.image_size):
        raise HybvitError(f"data '{data.name}' is {data.image_size}x{data.image_size}x{data.channels} but the model "
                          f"takes {cfg.model.image_size}x{cfg.model.image_size}x{cfg.model.channels}; use matching --data")
    report: dict[str, Any] = {"run": str(run_dir), "data": data.name, "mode": cfg.train.mode, "seed": seed}
    for name in metrics:
        t0 = time.time()
        if name == "accuracy":
            if cfg.train.mode == "genvit":
                raise HybvitError("metric 'accuracy' needs a classifier; this run was trained in genvit mode")
            if data.num_classes != cfg.model.num_classes:
                raise HybvitError(f"data has {data.num_classes} classes but the model {cfg.model.num_classes}")
            from .accuracy import evaluate_accuracy
            raw = None
            last = Path(run_dir) / "checkpoints" / "last.pt"
            if last.exists():
                raw = ViT(cfg.model)
                raw.load_state_dict(load_training_state(last)["model"])
                raw.to(run.device).eval()
            report["accuracy"] = evaluate_accuracy(run, data, raw, batch_size)
        elif name == "pixel-fd":
            if cfg.train.mode == "vit":
                raise HybvitError("metric 'pixel-fd' needs a generative model; this run was trained in vit mode")
            from .frechet import pixel_frechet_distance
            x = run.sample(num_samples, sampler=sampler, steps=steps, seed=seed, batch_size=batch_size)
            report["pixel-fd"] = {"value": pixel_frechet_distance(x, data.x_test), "num_samples": num_samples,
                                  "reference": "test set", "sampler": sampler,
                                  "steps": steps if sampler == "ddim" else cfg.diffusion.timesteps}
        report.setdefault("seconds", {})[name] = round(time.time() - t0, 2)
    return report


__all__ = ["METRICS", "parse_metrics", "evaluate_run"]
