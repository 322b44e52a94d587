"""`sample-analysis`: what the model's own classifier thinks of the model's own samples (the paper's Figures 10-11).

Classify the report's N samples with the HybViT head (EMA weights), and per predicted class rank them by two
scores: logsumexp of the logits (an unnormalised log p(x) under the JEM view) and max_y p(y|x) (confidence). The
best and worst samples per class go into grids (one row per class), and histograms compare the scores of samples
with those of real test images.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..data import ImageData, to_float
from ..sample import make_grid, save_png
from .plots import histograms


def _grid_rows(x: torch.Tensor, order_by_class: list[torch.Tensor], k: int, C: int, H: int) -> torch.Tensor:
    """One row of k images per class (blank where a class has fewer than k samples) -> (rows*k, C, H, W)."""
    rows = []
    for idx in order_by_class:
        row = torch.full((k, C, H, H), -1.0)
        row[:len(idx[:k])] = x[idx[:k]]
        rows.append(row)
    return torch.cat(rows)


def analyse_samples(run, data: ImageData, samples: torch.Tensor, per_class: int = 8, batch_size: int = 500,
                    out_dir: Path | None = None) -> dict[str, Any]:
    """samples: uint8 (N, C, H, W), the report's one sample set (drawn by `evaluate` or read with --samples)."""
    x = to_float(samples)                                                                        # (N, C, H, W)
    num_samples = len(x)
    logits = run.classify(samples, batch_size=batch_size)                                       # (N, K)
    test_logits = run.classify(data.x_test[:num_samples], batch_size=batch_size)
    K = logits.shape[1]
    probs = logits.softmax(1)
    conf, pred = probs.max(1)
    lse = logits.logsumexp(1)
    scores = {"logsumexp": lse, "max_softmax": conf}
    out: dict[str, Any] = {
        "num_samples": num_samples,
        "predicted_class_counts": torch.bincount(pred, minlength=K).tolist(),
        "mean_max_softmax": {"samples": float(conf.mean()), "test": float(test_logits.softmax(1).max(1).values.mean())},
        "mean_logsumexp": {"samples": float(lse.mean()), "test": float(test_logits.logsumexp(1).mean())},
        "per_class": [{"class": c, "count": int((pred == c).sum()),
                       "mean_logsumexp": float(lse[pred == c].mean()) if (pred == c).any() else None,
                       "mean_max_softmax": float(conf[pred == c].mean()) if (pred == c).any() else None}
                      for c in range(K)],
    }
    if out_dir is None:
        return out
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = {}
    C, H = x.shape[1], x.shape[2]
    for name, s in scores.items():
        ranked = [(pred == c).nonzero().flatten()[s[pred == c].argsort(descending=True)] for c in range(K)]
        for end, order in (("best", ranked), ("worst", [r.flip(0) for r in ranked])):
            path = out_dir / f"samples-{name}-{end}.png"
            save_png(path, make_grid(_grid_rows(x, order, per_class, C, H), nrow=per_class))
            plots[f"{end} by {name}"] = path.name
    plots["logsumexp histogram"] = Path(histograms(
        out_dir / "hist-logsumexp.png", {"samples": lse.numpy(), "test images": test_logits.logsumexp(1).numpy()},
        xlabel="logsumexp of logits", title="logsumexp: samples vs test images")).name
    plots["max softmax histogram"] = Path(histograms(
        out_dir / "hist-max-softmax.png",
        {"samples": conf.numpy(), "test images": test_logits.softmax(1).max(1).values.numpy()},
        xlabel="max p(y|x)", title="confidence: samples vs test images")).name
    out["plots"] = plots
    return out
