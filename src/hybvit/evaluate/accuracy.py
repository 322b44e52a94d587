"""Top-1 test accuracy of a run's classifier head (EMA weights, and raw weights when the checkpoint has them)."""
from __future__ import annotations

from typing import Any

import torch

from ..data import ImageData


@torch.no_grad()
def evaluate_accuracy(run, data: ImageData, raw_model=None, batch_size: int = 500) -> dict[str, Any]:
    from ..train import accuracy
    amp = run.config.train.amp
    out: dict[str, Any] = {"test_accuracy": accuracy(run.model, data.x_test, data.y_test, batch_size, amp),
                           "num_test_images": len(data.x_test)}
    if raw_model is not None:
        out["test_accuracy_raw"] = accuracy(raw_model, data.x_test, data.y_test, batch_size, amp)
    # per-class accuracy, for a quick look at where the classifier fails
    preds = run.predict(data.x_test)
    out["per_class_accuracy"] = [
        round(float((preds[data.y_test == c] == c).float().mean()), 4) if (data.y_test == c).any() else None
        for c in range(data.num_classes)]
    return out
