"""budget.py: a run's length in steps, its warm-up and periods; and what a wall-clock budget may and may not change
once training runs (only its length, never the configuration)."""
import json

import numpy as np
import pytest

import hybvit.train
from hybvit.budget import WARMUP_MAX_FRAC, every_steps, planned_steps, steps_per_epoch, warmup_steps
from hybvit.cli import main
from hybvit.config import preset_config
from hybvit.errors import HybvitError


def test_steps_epochs_and_periods():
    cfg = preset_config("digits-hybvit")
    cfg.train.batch_size, cfg.data.epoch_repeats = 100, 3
    assert steps_per_epoch(cfg, 1000) == 30                       # 3 passes over 1000 images in batches of 100
    cfg.train.steps = 0
    cfg.train.epochs = 2.5
    assert planned_steps(cfg, 1000) == 75
    cfg.train.epochs, cfg.train.minutes = 0.0, 5.0
    assert planned_steps(cfg, 1000) is None                       # estimated once training runs
    cfg.train.minutes = 0.0
    with pytest.raises(HybvitError, match="no training budget"):
        planned_steps(cfg, 1000)
    assert every_steps("2ep", cfg, 1000, "x") == 60 and every_steps("7", cfg, 1000, "x") == 7
    assert every_steps("", cfg, 1000, "x") == 0


def test_the_warm_up_never_takes_more_than_a_tenth_of_the_run():
    cfg = preset_config("digits-hybvit")
    cfg.train.batch_size, cfg.data.epoch_repeats, cfg.train.warmup_epochs = 100, 1, 10.0
    assert warmup_steps(cfg, 1000, total=10_000) == 100           # 10 epochs of 10 steps
    assert warmup_steps(cfg, 1000, total=500) == int(WARMUP_MAX_FRAC * 500) == 50


def test_a_minutes_run_records_the_configuration_its_first_step_used(tmp_path, monkeypatch):
    """Every adaptation to the data is decided before step 1: on a user's dataset with a wall-clock budget, the
    configuration the first step trains with is the one config.json records at the end (the budget's estimate
    after 10 steps fixes only the schedule's length)."""
    g = np.random.default_rng(0)
    x = g.integers(0, 256, (64, 28, 28), dtype=np.uint8)
    y = np.arange(64) % 4
    np.savez(tmp_path / "mine.npz", x_train=x, y_train=y, x_test=x[:12], y_test=y[:12])
    seen = []
    step = hybvit.train.train_step

    def recording_step(tr, i, lr):
        if not seen:
            seen.append(json.loads(json.dumps(tr.cfg.to_dict())))
        return step(tr, i, lr)
    monkeypatch.setattr(hybvit.train, "train_step", recording_step)
    out = tmp_path / "run"
    assert main(["train", "--data", f"npz:{tmp_path / 'mine.npz'}", "--minutes", "0.1", "--out", str(out), "--quiet",
                 "--set", "model.dim=32", "--set", "model.depth=1", "--set", "model.heads=2",
                 "--set", "batch_size=16"]) == 0
    recorded = json.loads((out / "config.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] > 10                                   # the estimate after step 10 did happen
    assert seen[0] == recorded and recorded["data"]["crop_padding"] == 4 and recorded["train"]["minutes"] == 0.1
