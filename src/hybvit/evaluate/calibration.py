"""Calibration of the classifier head: expected calibration error and reliability diagrams.

The paper (Sec. 5.2.1, Fig. 6; App. C.5, Fig. 12) compares ViT and HybViT with WRN and JEM by the Expected
Calibration Error of Guo et al. (2017) on the CIFAR-10 test set, drawn as reliability diagrams. Its code used
20 equal-width bins (REFERENCE-NOTES, "Evaluation as they ran it"); the field's common choice is 15, so the
number of bins is a parameter and `evaluate_ece` reports both by default.

Definition (Guo et al. 2017, Eq. 3). With confidence c_i = max_k p_ik, prediction argmax_k p_ik and
M equal-width bins B_m = ((m-1)/M, m/M] on c (a confidence of exactly 1 falls in the last bin):

    ECE = sum_m |B_m| / N * | acc(B_m) - conf(B_m) |,      MCE = max_{m: |B_m| > 0} | acc(B_m) - conf(B_m) |.

Note on bin edges: torchmetrics' MulticlassCalibrationError uses [lower, upper) bins plus an extra bin for a
confidence of exactly 1; the two agree whenever no confidence lies exactly on an inner edge or at 1.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from ..data import ImageData
from ..errors import HybvitError
from .plots import reliability_diagram


def calibration(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> dict[str, Any]:
    """Calibration metrics of predicted class probabilities `probs` (N, K) against integer `labels` (N,).

    Returns a JSON-ready dict:
      ece, mce          expected and maximum calibration error over n_bins equal-width confidence bins
      n_bins, num_images
      accuracy          top-1 accuracy
      mean_confidence   mean of max_k p_k (accuracy - mean_confidence < 0 means over-confident on average)
      nll               mean negative log-likelihood -log p_{y} (natural log)
      brier             multi-class Brier score, mean over images of sum_k (p_k - 1[k = y])^2 (range [0, 2])
      bins              list of {lower, upper, count, accuracy, confidence}; accuracy and confidence are
                        None for an empty bin
    Computed in float64."""
    if n_bins < 1:
        raise HybvitError(f"n_bins must be >= 1 (got {n_bins})")
    if probs.dim() != 2 or labels.dim() != 1 or len(probs) != len(labels):
        raise HybvitError(f"calibration needs probs (N, K) and labels (N,); got {tuple(probs.shape)} and "
                          f"{tuple(labels.shape)}")
    if len(probs) == 0:
        raise HybvitError("calibration needs at least one prediction")
    p = probs.detach().to("cpu", torch.float64)
    y = labels.detach().to("cpu", torch.long)
    if not torch.isfinite(p).all() or p.min() < 0 or p.max() > 1 or (p.sum(1) - 1).abs().max() > 1e-3:
        raise HybvitError("calibration needs probabilities (rows in [0, 1] summing to 1); "
                          "pass softmax(logits), not logits")
    if y.min() < 0 or y.max() >= p.shape[1]:
        raise HybvitError(f"labels must lie in [0, {p.shape[1] - 1}] for {p.shape[1]} classes")
    n = len(p)
    conf, pred = p.max(1)
    correct = (pred == y).to(torch.float64)

    edges = torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64)
    # bucketize(right=False) gives i with edges[i-1] < c <= edges[i]: bin i-1 is (lower, upper]
    idx = (torch.bucketize(conf, edges, right=False) - 1).clamp(0, n_bins - 1)
    count = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, torch.ones_like(conf))
    conf_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, conf)
    acc_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, correct)
    filled = count > 0
    acc_bin = torch.where(filled, acc_sum / count.clamp_min(1), torch.zeros_like(count))
    conf_bin = torch.where(filled, conf_sum / count.clamp_min(1), torch.zeros_like(count))
    gap = (acc_bin - conf_bin).abs()
    ece = float((gap * count).sum() / n)
    mce = float(gap[filled].max())

    p_true = p.gather(1, y[:, None]).squeeze(1)
    nll = float(-(p_true.clamp_min(1e-300)).log().mean())
    onehot = torch.zeros_like(p).scatter_(1, y[:, None], 1.0)
    brier = float(((p - onehot) ** 2).sum(1).mean())

    bins = [{"lower": float(edges[m]), "upper": float(edges[m + 1]), "count": int(count[m]),
             "accuracy": float(acc_bin[m]) if filled[m] else None,
             "confidence": float(conf_bin[m]) if filled[m] else None} for m in range(n_bins)]
    return {"ece": ece, "mce": mce, "n_bins": n_bins, "num_images": n, "accuracy": float(correct.mean()),
            "mean_confidence": float(conf.mean()), "nll": nll, "brier": brier, "bins": bins}


def check_classifier(run, data: ImageData, metric: str) -> None:
    """One-line errors for a run without a classifier head or data with another number of classes."""
    if run.config.train.mode == "genvit":
        raise HybvitError(f"metric '{metric}' needs a classifier; this run was trained in genvit mode")
    if data.num_classes != run.model.cfg.num_classes:
        raise HybvitError(f"data '{data.name}' has {data.num_classes} classes but the model "
                          f"{run.model.cfg.num_classes}; use the data the run was trained on")


@torch.no_grad()
def evaluate_ece(run, data: ImageData, n_bins_list: Sequence[int] = (15, 20),
                 out_dir: str | Path | None = None, batch_size: int = 500) -> dict[str, Any]:
    """ECE of a run's classifier (EMA weights, as `Run.classify`) on the whole test set of `data`, once per
    number of bins (Sec. 5.2.1 / App. C.5; the paper's code used 20 bins, 15 is the common choice).

    Returns {"num_images", "weights": "ema", "accuracy", "mean_confidence", "nll", "brier",
             "ece": {"15": ..., "20": ...}, "mce": {...}, "by_bins": {"15": calibration(...), ...},
             "plots": {"15": "reliability_15bins.png", ...}}  (plots only when out_dir is given; paths are
    relative to out_dir)."""
    check_classifier(run, data, "ece")
    if not n_bins_list:
        raise HybvitError("give at least one number of bins for the ECE")
    logits = run.classify(data.x_test, batch_size=batch_size)
    probs = torch.softmax(logits.double(), dim=1)
    out: dict[str, Any] = {"num_images": len(probs), "weights": "ema"}
    by_bins = {str(int(m)): calibration(probs, data.y_test, int(m)) for m in n_bins_list}
    first = next(iter(by_bins.values()))
    for key in ("accuracy", "mean_confidence", "nll", "brier"):
        out[key] = first[key]
    out["ece"] = {k: v["ece"] for k, v in by_bins.items()}
    out["mce"] = {k: v["mce"] for k, v in by_bins.items()}
    out["by_bins"] = by_bins
    if out_dir is not None:
        out["plots"] = {}
        for k, v in by_bins.items():
            name = f"reliability_{k}bins.png"
            reliability_diagram(Path(out_dir) / name, v["bins"],
                                title=f"{data.name} test, {v['num_images']} images: ECE {100 * v['ece']:.2f}% "
                                      f"({k} bins), accuracy {100 * v['accuracy']:.1f}%")
            out["plots"][k] = name
    return out


__all__ = ["calibration", "evaluate_ece", "check_classifier"]
