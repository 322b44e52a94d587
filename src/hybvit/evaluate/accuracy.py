"""Top-1 test accuracy of a run's classifier head (EMA weights, and raw weights when the checkpoint has them)."""
from __future__ import annotations

from typing import Any

import torch

from ..data import ImageData
from ..model import ViT
from ..sample import classify_batches


def accuracy(model: ViT, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500, amp: str = "auto",
             progress: str | None = None) -> float:
    """Top-1 accuracy of model.classify on uint8 images x (N, C, H, W) with labels y (N,); progress: a bar's label."""
    if len(x) == 0:
        return 0.0
    return (classify_batches(model, x, batch_size, amp, progress).argmax(1) == y).sum().item() / len(x)


def evaluate_accuracy(run, data: ImageData, raw_model=None, batch_size: int = 500) -> dict[str, Any]:
    amp = run.config.train.amp
    preds = classify_batches(run.model, data.x_test, batch_size, amp).argmax(1)
    out: dict[str, Any] = {"test_accuracy": (preds == data.y_test).sum().item() / max(1, len(data.x_test)),
                           "num_test_images": len(data.x_test)}
    if raw_model is not None:
        out["test_accuracy_raw"] = accuracy(raw_model, data.x_test, data.y_test, batch_size, amp)
    # per-class accuracy, for a quick look at where the classifier fails
    out["per_class_accuracy"] = [
        round(float((preds[data.y_test == c] == c).float().mean()), 4) if (data.y_test == c).any() else None
        for c in range(data.num_classes)]
    return out
