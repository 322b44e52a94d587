"""resolve.py: from the command line to a run's configuration. Your own data gets the own-data preset, which takes
its model and recipe from the data, records every choice in config.json and keeps what the user set; the digits
preset on other data keeps its number of tokens; and the own-data panel benchmark runs end to end."""
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
    tiny = ["--set", "model.dim=32", "--set", "model.depth=2", "--set", "model.heads=2", "--set", "fd_samples=0"]
    # no preset on a user's dataset: the own-data preset, decided before the first step
    assert main(["train", "--data", f"npz:{data}", "--steps", "1", "--out", str(tmp_path / "r"), "--quiet", *tiny]) == 0
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    m = cfg["model"]
    assert cfg["preset"] == "own-data" and (m["image_size"], m["channels"], m["num_classes"]) == (size, channels, 4)
    assert m["patch_size"] == 4 and m["plus"] and cfg["diffusion"]["prediction"] == "v"
    assert cfg["data"]["crop_padding"] == 4 and not cfg["data"]["hflip"] and cfg["train"]["label_smoothing"] == 0.1
    assert m["dim"] == 32                                      # --set wins over the preset
    notes = " | ".join(cfg["notes"])
    assert "patch size 4" in notes and "4-pixel padding" in notes
    out = capsys.readouterr().out
    assert "adapted to the data: patch size 4" in out and "docs/results/own-data.md" in out and "expect" not in out
    # naming it gives the same configuration
    assert main(["train", "--data", f"npz:{data}", "--steps", "1", "--out", str(tmp_path / "o"), "--quiet", *tiny,
                 "--preset", "own-data"]) == 0
    assert json.loads((tmp_path / "o" / "config.json").read_text()) == cfg
    # what the user sets is kept
    assert main(["train", "--data", f"npz:{data}", "--steps", "1", "--out", str(tmp_path / "p"), "--quiet", *tiny,
                 "--set", "model.patch_size=2", "--set", "crop_padding=1"]) == 0
    cfg = json.loads((tmp_path / "p" / "config.json").read_text())
    assert cfg["model"]["patch_size"] == 2 and cfg["data"]["crop_padding"] == 1


@pytest.mark.parametrize("size,channels", [(28, 1), (32, 3)])
def test_the_digits_preset_on_other_data_keeps_its_tokens(tmp_path, size, channels):
    """The digits preset adapted to data it was not named for keeps its 16 tokens where a patch fits the token, and
    takes more tokens where it would not."""
    from hybvit.config import preset_config
    from hybvit.datasets import load_data
    from hybvit.resolve import adapt_model_to_data
    data = load_data(f"npz:{npz(tmp_path / 'd.npz', size, channels)}")
    cfg = preset_config("digits-hybvit")
    cfg.model.dim = 64
    notes = adapt_model_to_data(cfg, data, preset_named=False, explicit=set())
    tokens = (size // cfg.model.patch_size) ** 2
    # 16 tokens where a patch fits the 64-wide token (7x7x1 = 49 values); 8x8x3 = 192 does not, so 4x4 patches
    assert tokens == (16 if channels == 1 else 64) and not cfg.model.plus and cfg.data.crop_padding == 0
    assert (channels == 3) == any("patch 8 would give each 64-wide token 192 values" in n for n in notes)


def test_a_token_narrower_than_its_patch_cannot_carry_the_noise():
    """With P*P*C > D the map from x_t to the predicted noise passes a D-dimensional bottleneck: its Jacobian on a
    patch has rank at most D, so it cannot even express eps = x_t (what the denoiser must predict at high noise).
    narrow_tokens says so; a wide enough token has a full-rank Jacobian."""
    import torch
    from hybvit.config import ModelConfig
    from hybvit.model import ViT
    from hybvit.resolve import narrow_tokens
    torch.manual_seed(0)
    for dim, narrow in ((32, True), (64, False)):
        cfg = ModelConfig(image_size=4, channels=3, patch_size=4, num_classes=2, dim=dim, depth=1, heads=2)
        model = ViT(cfg)
        t = torch.tensor([500])
        jac = torch.autograd.functional.jacobian(lambda x: model.denoise(x, t).flatten(), torch.randn(1, 3, 4, 4))
        rank = torch.linalg.matrix_rank(jac.reshape(48, 48)).item()
        assert (rank <= dim) and (rank == 48) != narrow, (dim, rank)
        assert bool(narrow_tokens(cfg)) == narrow
    assert "48 values, more than the token's width 32" in narrow_tokens(ModelConfig(
        image_size=4, channels=3, patch_size=4, num_classes=2, dim=32, depth=1, heads=2))


def test_the_default_run_keeps_the_digits_preset():
    from hybvit.cli import build_parser
    from hybvit.resolve import resolve_train_config
    cfg, data, _, _ = resolve_train_config(build_parser().parse_args(["train", "--out", "/nonexistent/run"]))
    assert cfg.preset == "digits-hybvit" and cfg.model.patch_size == 2 and data.name == "digits"
    assert [n.split(" ->")[0] for n in cfg.notes] == ["amp auto"] and cfg.train.amp in ("bf16", "fp32")


def test_own_data_panel_smoke(tmp_path):
    """benchmarks/own_data.py --smoke: every step of the panel on digits28 (tiny models, seconds)."""
    out, judges = tmp_path / "panel", tmp_path / "judges"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "own_data.py"), "--smoke", "--judges", str(judges), "--out"]
    subprocess.run([*cmd, str(out)], check=True, capture_output=True)
    result = json.loads(Path(f"{out}.json").read_text())
    entry = result["datasets"]["digits28"]
    assert not entry["judge"]["reused"] and not entry["cnn"]["reused"]
    assert list(entry["rows"]) == ["no-preset"] and entry["rows"]["no-preset"]["patch"] == 4     # own-data's patch
    assert entry["scale"]["real_vs_real_fd"] < entry["scale"]["noise_vs_real_fd"]
    for row in entry["rows"].values():
        assert np.isfinite(row["feature_fd"]) and sum(row["class_shares"]) == pytest.approx(1, abs=0.01)
        assert max(row["class_shares"]) == row["largest_class_share"]
    assert Path(f"{out}-digits28-no-preset.png").exists() and "| digits28 |" in Path(f"{out}.md").read_text()
    # a second invocation scores in the same judge's features: the same scale, without retraining it
    subprocess.run([*cmd, str(tmp_path / "again"), "--rows", "classifier-only"], check=True, capture_output=True)
    again = json.loads((tmp_path / "again.json").read_text())["datasets"]["digits28"]
    assert again["judge"]["reused"] and again["cnn"]["reused"] and again["scale"] == entry["scale"]
    # the classifier alone: the same adapted model with no diffusion loss, so nothing to sample or score
    alone = again["rows"]["classifier-only"]
    assert alone["mode"] == "vit" and "feature_fd" not in alone and alone["patch"] == 4 and alone["epochs"] > 0
    assert not Path(f"{tmp_path / 'again'}-digits28-classifier-only.png").exists()
    assert f"| classifier-only | 4 | {alone['steps']} | {alone['epochs']} |" in (tmp_path / "again.md").read_text()
