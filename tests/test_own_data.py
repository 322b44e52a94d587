"""Your own data: `--preset own-data` takes the model and recipe from the data, records every choice in config.json
and keeps what the user set; `hybvit train --data npz:PATH` with no preset adapts the digits preset and prints
what the panel measured for it; and the panel benchmark runs end to end."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hybvit.cli import main
from hybvit.resolve import own_data_patch

ROOT = Path(__file__).resolve().parents[1]


def npz(path: Path, size: int, channels: int, n: int = 40, classes: int = 4) -> Path:
    g = np.random.default_rng(0)
    shape = (n, size, size) if channels == 1 else (n, size, size, channels)
    y = np.arange(n) % classes
    np.savez(path, x_train=g.integers(0, 256, shape, dtype=np.uint8), y_train=y,
             x_test=g.integers(0, 256, shape, dtype=np.uint8)[:12], y_test=y[:12])
    return path


def test_patch_sizes_give_a_grid_near_eight_tokens_a_side():
    for size, patch in ((28, 4), (32, 4), (64, 8), (96, 12), (16, 2), (8, 1), (30, 3)):
        assert own_data_patch(size) == patch and size % patch == 0


@pytest.mark.parametrize("size,channels", [(28, 1), (32, 3)])
def test_own_data_preset_is_sized_from_the_data_and_recorded(tmp_path, size, channels, capsys):
    data = npz(tmp_path / "mine.npz", size, channels)
    tiny = ["--set", "model.dim=32", "--set", "model.depth=2", "--set", "model.heads=2", "--set", "num_samples=0",
            "--set", "fd_samples=0", "--preset", "own-data"]
    assert main(["train", "--data", f"npz:{data}", "--steps", "1", "--out", str(tmp_path / "r"), "--quiet", *tiny]) == 0
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    m = cfg["model"]
    assert cfg["preset"] == "own-data" and (m["image_size"], m["channels"], m["num_classes"]) == (size, channels, 4)
    assert m["patch_size"] == 4 and m["time_cond"] == "adaln" and m["long_skips"] and cfg["diffusion"]["prediction"] == "v"
    assert cfg["data"]["crop_padding"] == 4 and not cfg["data"]["hflip"] and cfg["train"]["label_smoothing"] == 0.1
    assert m["dim"] == 32                                      # --set wins over the default
    notes = " | ".join(cfg["notes"])
    assert "patch size 4" in notes and "4-pixel padding" in notes
    out = capsys.readouterr().out
    assert "adapted to the data: patch size 4" in out and "expect: on " in out and "own-data" in out
    # what the user sets is kept; with no preset the digits preset is adapted (its 16 tokens kept)
    assert main(["train", "--data", f"npz:{data}", "--steps", "1", "--out", str(tmp_path / "p"), "--quiet", *tiny,
                 "--set", "model.patch_size=2", "--set", "crop_padding=1"]) == 0
    cfg = json.loads((tmp_path / "p" / "config.json").read_text())
    assert cfg["model"]["patch_size"] == 2 and cfg["data"]["crop_padding"] == 1
    assert main(["train", "--data", f"npz:{data}", "--steps", "1", "--out", str(tmp_path / "d"), "--quiet",
                 *tiny[:-2]]) == 0
    cfg = json.loads((tmp_path / "d" / "config.json").read_text())
    tokens = (size // cfg["model"]["patch_size"]) ** 2
    assert cfg["preset"] == "digits-hybvit" and tokens == 16 and cfg["model"]["time_cond"] == "token-scalar"
    assert cfg["model"]["conv_stem"] == 16 and any(n.startswith("conv stem 16") for n in cfg["notes"])
    out = capsys.readouterr().out
    assert "expect: on " in out and "adapted to the data: conv stem 16" in out
    # a named preset, or --set model.conv_stem=0, keeps the linear patch embedding
    assert main(["train", "--data", f"npz:{data}", "--steps", "1", "--out", str(tmp_path / "n"), "--quiet",
                 *tiny[:-2], "--set", "model.conv_stem=0"]) == 0
    assert json.loads((tmp_path / "n" / "config.json").read_text())["model"]["conv_stem"] == 0


def test_conv_stem_feeds_both_heads():
    """model.conv_stem: (B, C, H, W) -> two 3x3 convolutions -> patches; the classifier and the denoiser both train
    it, and the output keeps the image's shape."""
    import torch
    from hybvit.config import preset_config
    from hybvit.model import ViT
    cfg = preset_config("digits-hybvit").model
    cfg.dim, cfg.depth, cfg.heads, cfg.conv_stem = 32, 2, 2, 8
    model = ViT(cfg)
    assert model.patch_embed.in_features == 2 * 2 * 8
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([1, 10, 500])
    assert model.denoise(x, t).shape == x.shape and model.classify(x).shape == (3, 10)
    for loss in (model.classify(x).sum(), model.denoise(x, t).pow(2).sum()):
        model.zero_grad()
        loss.backward()
        assert model.stem[2].weight.grad.abs().sum() > 0
    plain = preset_config("digits-hybvit").model
    plain.dim, plain.depth, plain.heads = 32, 2, 2
    assert model.flops_per_image() > ViT(plain).flops_per_image()


def test_the_default_run_keeps_the_digits_preset():
    from hybvit.cli import build_parser
    from hybvit.resolve import resolve_train_config
    cfg, data, _, _ = resolve_train_config(build_parser().parse_args(["train", "--out", "/nonexistent/run"]))
    assert cfg.preset == "digits-hybvit" and cfg.model.patch_size == 2 and data.name == "digits"
    assert [n.split(" ->")[0] for n in cfg.notes] == ["amp auto"] and cfg.train.amp in ("bf16", "fp32")


def test_own_data_panel_smoke(tmp_path):
    """benchmarks/own_data.py --smoke: every step of the panel on digits28 (tiny models, seconds)."""
    out = tmp_path / "panel"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "own_data.py"), "--smoke", "--out", str(out)],
                   check=True, capture_output=True)
    result = json.loads(Path(f"{out}.json").read_text())
    entry = result["datasets"]["digits28"]
    assert entry["rows"]["no-preset"]["patch"] == 7 and entry["rows"]["own-data"]["patch"] == 4
    assert entry["scale"]["real_vs_real_fd"] < entry["scale"]["noise_vs_real_fd"]
    for row in entry["rows"].values():
        assert np.isfinite(row["feature_fd"]) and sum(row["class_shares"]) == pytest.approx(1, abs=0.01)
        assert max(row["class_shares"]) == row["largest_class_share"]
    assert Path(f"{out}-digits28-own-data.png").exists() and "| digits28 |" in Path(f"{out}.md").read_text()
