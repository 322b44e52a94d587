"""`hybvit export`: a run's EMA weights as a model folder to share, in the layout the Hugging Face Hub serves.

  MODEL_DIR/config.json          the run's configuration
  MODEL_DIR/model.safetensors    the EMA weights (the config also in the safetensors metadata)
  MODEL_DIR/README.md            a model card: what it is, its metrics with the commands that gave them, how to
                                 load it

`load_run(MODEL_DIR)`, `hybvit sample --run MODEL_DIR` and `hybvit evaluate --run MODEL_DIR` read the folder.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from . import checkpoint as ckpt
from .errors import HybvitError
from .sample import load_run


def export_run(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Write the model folder out_dir (new or empty) from the run in run_dir, all or nothing."""
    run = load_run(run_dir, device="cpu")                 # checks the weights against the config
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise HybvitError(f"--out '{out}' exists and is not an empty folder; give a new folder for the model")
    metrics_path = Path(run_dir) / "metrics.json"
    metrics = ckpt.read_json(metrics_path, "metrics") if metrics_path.exists() else None

    def write(tmp: Path) -> None:
        cfg = run.config.to_dict()
        ckpt.write_json(tmp / "config.json", cfg)
        ckpt.save_weights(tmp / "model.safetensors", ckpt.plain_state_dict(run.model), cfg)
        (tmp / "README.md").write_text(model_card(run, metrics))
    ckpt.write_folder(out, write)
    return out


def model_card(run, metrics: dict[str, Any] | None) -> str:
    cfg, m = run.config, run.config.model
    what = {"hybvit": "HybViT: one Vision Transformer that classifies (CLS token) and generates (DDPM denoiser)",
            "genvit": "GenViT: a Vision Transformer as the denoiser of a DDPM", "vit": "a ViT classifier"}
    trainer = "by the paper's code" if (metrics or {}).get("imported_from") else "with hybvit"
    lines = ["---", "library_name: hybvit", "tags:", "- vision-transformer", "- image-classification"]
    if cfg.train.mode != "vit":
        lines += ["- diffusion", "- image-generation"]
    lines += ["---", "", f"# {cfg.preset or 'hybvit'} ({cfg.train.mode})", "",
              f"{what[cfg.train.mode]}, trained {trainer} on `{cfg.data.spec}`: "
              f"{m.image_size}x{m.image_size}x{m.channels} images, {m.num_classes} classes, patch {m.patch_size}, "
              f"D {m.dim}, depth {m.depth}, {run.model.num_params():,} parameters. The weights are the EMA weights "
              f"(decay {cfg.train.ema_decay}) of the run.", ""]
    source = (metrics or {}).get("imported_from")
    if source:
        lines += ["## Origin", "", f"Imported by `hybvit import` from a checkpoint of the paper's code "
                  f"(github sndnyang/Diffusion_ViT): `{Path(source.get('file', '?')).name}`, sha256 "
                  f"`{source.get('sha256')}`, {'EMA' if source.get('weights') == 'ema' else 'raw'} weights. "
                  f"hybvit computes the same outputs from them (tests/test_official.py).", ""]
    elif metrics:
        lines += ["## Metrics", "", "| metric | value |", "|---|---|"]
        for key in ("test_accuracy", "test_accuracy_raw", "pixel_fd", "steps", "train_seconds", "images_per_second"):
            if key in metrics:
                lines.append(f"| {key} | {metrics[key]} |")
        prov = metrics.get("provenance") or {}
        if prov:
            lines += ["", f"Measured at the end of training by `{prov.get('command', 'hybvit train')}` on "
                          f"{prov.get('device_name', metrics.get('device', '?'))} ({prov.get('precision')}), hybvit "
                          f"{prov.get('hybvit')} (commit {(prov.get('git_commit') or '?')[:12]}), torch "
                          f"{prov.get('torch')}."]
        lines.append("")
    lines += ["## Use", "", "```bash", "pip install hybvit",
              "hybvit sample --run THIS_FOLDER --num 64 --out samples.png" if cfg.train.mode != "vit" else
              "hybvit evaluate --run THIS_FOLDER --metrics accuracy --out report.json",
              "```", "", "```python", "from hybvit.sample import load_run", "", "run = load_run(\"THIS_FOLDER\")"]
    if cfg.train.mode != "genvit":
        lines.append("logits = run.classify(images)          # uint8 (N, C, H, W) or floats in [-1, 1]")
    if cfg.train.mode != "vit":
        lines.append("x = run.sample(16, sampler=\"ddim\", steps=50)   # floats (16, C, H, W) in [-1, 1]")
    lines += ["```", "", "## Configuration", "", "```json", json.dumps(cfg.to_dict(), indent=1), "```", ""]
    return "\n".join(lines)


__all__ = ["export_run", "model_card"]
