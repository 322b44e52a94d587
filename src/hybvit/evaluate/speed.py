"""`speed`: training throughput from the run's own records, and sampling images/s measured now per sampler."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


def training_speed(run_dir: Path, cfg, n_train: int) -> dict[str, Any]:
    """Images/s, seconds per step and minutes per epoch (epoch = data.epoch_repeats x the training set, as the
    run defines it) from metrics.json; None where the run has not finished."""
    path = Path(run_dir) / "metrics.json"
    if not path.exists():
        return {"note": "no metrics.json: the run has not finished"}
    m = json.loads(path.read_text())
    steps, secs = m.get("steps"), m.get("train_seconds")
    out: dict[str, Any] = {k: m.get(k) for k in ("images_per_second", "train_gflops_per_second", "steps",
                                                  "train_seconds", "device")}
    if steps and secs:
        steps_per_epoch = cfg.data.epoch_repeats * n_train / cfg.train.batch_size
        out["seconds_per_step"] = round(secs / steps, 4)
        out["steps_per_epoch"] = round(steps_per_epoch, 1)
        out["minutes_per_epoch"] = round(steps_per_epoch * secs / steps / 60, 3)
    return out


def sampling_speed(run, samplers: list[tuple[str, int]], num_samples: int = 64, seed: int = 0,
                   batch_size: int = 500) -> list[dict[str, Any]]:
    """Images/s for each (sampler, steps), timing num_samples images after a 2-image warm-up."""
    rows = []
    for sampler, steps in samplers:
        run.sample(2, sampler=sampler, steps=steps, seed=seed, batch_size=batch_size)
        t0 = time.perf_counter()
        run.sample(num_samples, sampler=sampler, steps=steps, seed=seed, batch_size=batch_size)
        dt = time.perf_counter() - t0
        nfe = run.diffusion.T if sampler == "ancestral" else steps
        rows.append({"sampler": sampler, "network_evaluations": nfe, "images": num_samples,
                     "seconds": round(dt, 3), "images_per_second": round(num_samples / dt, 2)})
    return rows
