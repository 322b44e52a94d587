"""Out-of-distribution detection by AUROC, as Table 3 (Sec. 5.2.2) and Table 11 (App. C.3).

A score s(x) (higher = more in-distribution) separates in-distribution test images (the positive class) from
an OOD set; the threshold-free AUROC (Hendrycks & Gimpel 2017) measures how well. The paper's scores are
  log p(x) ~ logsumexp_y f(x)[y]      the classifier seen as an energy model (JEM), Table 3 / Table 11 top
  max_y p(y|x)                        the maximum softmax probability, Table 11 bottom
and its OOD sets are SVHN, CIFAR-100, CelebA (resized to 32) and "interp", the average of two random CIFAR-10
test images. Further scores (e.g. a diffusion bits/dim, negated) come in through `extra_scores`.

The AUROC here is the Mann-Whitney U statistic with tied scores counted as one half, equal to
sklearn.metrics.roc_auc_score (which the paper's code used) and to the area under `roc_curve`.
"""
from __future__ import annotations

import re
import zlib
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from ..data import ImageData, to_float
from ..datasets import default_root, load_celeba_test_stretched, load_data
from ..errors import HybvitError
from .calibration import check_classifier
from .plots import histograms, roc_curves

LOGIT_SCORES = ("logsumexp", "max_softmax")


def score_logits(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """The paper's two classifier scores from logits (N, K), higher = more in-distribution (float64, (N,)):
    "logsumexp" = log sum_y exp f(x)[y] (log p(x) up to the constant log Z, Table 3) and
    "max_softmax" = max_y softmax(f(x))[y] (Table 11, bottom rows)."""
    if logits.dim() != 2:
        raise HybvitError(f"logits must be (N, classes); got shape {tuple(logits.shape)}")
    z = logits.detach().double()
    return {"logsumexp": torch.logsumexp(z, dim=1), "max_softmax": torch.softmax(z, dim=1).max(1).values}


def _check_scores(in_scores: torch.Tensor, out_scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a = torch.as_tensor(in_scores).detach().to("cpu", torch.float64).reshape(-1)
    b = torch.as_tensor(out_scores).detach().to("cpu", torch.float64).reshape(-1)
    if len(a) == 0 or len(b) == 0:
        raise HybvitError("AUROC needs at least one in-distribution and one OOD score")
    if torch.isnan(a).any() or torch.isnan(b).any():
        raise HybvitError("OOD scores contain NaN; check the score function")
    return a, b


def auroc(in_scores: torch.Tensor, out_scores: torch.Tensor) -> float:
    """Area under the ROC curve with in-distribution as the positive class:
    P(s_in > s_out) + 1/2 P(s_in = s_out), computed from average ranks (Mann-Whitney U / (n_in n_out))."""
    a, b = _check_scores(in_scores, out_scores)
    n_in, n_out = len(a), len(b)
    _, inverse, counts = torch.unique(torch.cat([a, b]), sorted=True, return_inverse=True,
                                      return_counts=True)
    ends = counts.cumsum(0).to(torch.float64)          # 1-based rank of the last element of each tie group
    avg_rank = ends - (counts.to(torch.float64) - 1) / 2  # mean of ranks end - count + 1 .. end
    rank_sum_in = avg_rank[inverse[:n_in]].sum()
    u = rank_sum_in - n_in * (n_in + 1) / 2
    return float(u / (n_in * n_out))


def roc_curve(in_scores: torch.Tensor, out_scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fpr, tpr) at every distinct threshold, from (0, 0) to (1, 1); in-distribution is positive. Tied scores
    give one diagonal segment, so the trapezoidal area under the curve equals `auroc`."""
    a, b = _check_scores(in_scores, out_scores)
    scores = torch.cat([a, b])
    positive = torch.cat([torch.ones(len(a)), torch.zeros(len(b))]).double()
    order = torch.argsort(scores, descending=True, stable=True)
    s, pos = scores[order], positive[order]
    last_of_group = torch.ones(len(s), dtype=torch.bool)
    last_of_group[:-1] = s[1:] != s[:-1]
    tp = pos.cumsum(0)[last_of_group]
    fp = (1 - pos).cumsum(0)[last_of_group]
    zero = torch.zeros(1, dtype=torch.float64)
    return torch.cat([zero, fp / len(b)]), torch.cat([zero, tp / len(a)])


INTERP_BATCH = 100      # the paper code's OOD loader batch: each interp image mixes a batch with the one before


def interp_images(x_uint8: torch.Tensor, n: int | None = None, generator: torch.Generator | None = None,
                  return_pairs: bool = False):
    """The paper's "interp" OOD set (Table 3) as its code made it (Task/eval_tasks.py): the test set in a random
    order, cut into batches of 100, every image of a batch averaged with the image at the same place in the batch
    before, as floats in [-1, 1] (not rounded to the 256 levels): N - 100 images for N test images (9,900 for
    CIFAR-10; half-batches of N // 2 when N < 200). n: the first n of them (None = all). Returns floats
    (n, C, H, W); with return_pairs also the (n, 2) indices of the averaged images."""
    if x_uint8.dtype != torch.uint8:
        raise HybvitError("interp_images takes uint8 images")
    N = len(x_uint8)
    if N < 2:
        raise HybvitError("interp images need at least two images to average")
    lag = min(INTERP_BATCH, N // 2)
    order = torch.randperm(N, generator=generator)
    pairs = torch.stack([order[lag:], order[:-lag]], 1)[:n]        # (N - lag, 2): image, its partner
    out = (to_float(x_uint8[pairs[:, 0]]) + to_float(x_uint8[pairs[:, 1]])) / 2
    return (out, pairs) if return_pairs else out


def noise_images(n: int, shape: Sequence[int], generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform noise images, each pixel independent and uniform on {0, ..., 255}: uint8 (n, *shape)."""
    return torch.randint(0, 256, (n, *shape), generator=generator, dtype=torch.uint8)


def match_channels(x: torch.Tensor, channels: int, name: str = "images") -> torch.Tensor:
    """uint8 (N, C, H, W) to `channels` channels: grayscale -> RGB repeats the channel; RGB -> grayscale takes
    the ITU-R BT.601 luma 0.299 R + 0.587 G + 0.114 B (rounded); an alpha channel (C = 4) is dropped first."""
    c = x.shape[1]
    if c == channels:
        return x
    if c == 4:
        x, c = x[:, :3], 3
        if channels == 3:
            return x
    if c == 1 and channels == 3:
        return x.repeat(1, 3, 1, 1)
    if c == 3 and channels == 1:
        w = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float32).view(1, 3, 1, 1)
        return (x.float() * w).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
    raise HybvitError(f"{name} have {x.shape[1]} channels but the model takes {channels}; only grayscale <-> RGB "
                      f"(and dropping alpha) can be converted")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:60] or "set"


def _set_generator(seed: int, name: str) -> torch.Generator:
    """A generator per OOD set from (seed, name): a set's images do not depend on which other sets are asked for."""
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 63))


def ood_images(data: ImageData, spec: str, num_images: int | None, generator: torch.Generator) -> torch.Tensor:
    """The OOD images of one entry: "interp" (floats in [-1, 1]), "noise", or a data spec whose test images are
    resized to the data's size and converted to its channels (uint8); num_images: the first so many (None = all,
    the paper's protocol; noise: as many as the in-distribution test set). CelebA (celeba128) is read as the
    paper's code read it: the test split, each whole image stretched to the data's size, not centre-cropped."""
    shape = (data.channels, data.image_size, data.image_size)
    if spec == "interp":
        return interp_images(data.x_test, num_images, generator)
    if spec == "noise":
        return noise_images(num_images or len(data.x_test), shape, generator)
    kind, _, root = spec.partition(":")
    if kind == "celeba128":
        x_test = load_celeba_test_stretched(Path(root or default_root()).expanduser(), data.image_size)
    else:
        x_test = load_data(spec, data.image_size).x_test
    x = match_channels(x_test[:num_images], data.channels, name=f"OOD data '{spec}' images")
    if len(x) == 0:
        raise HybvitError(f"OOD data '{spec}' has no test images")
    return x


def evaluate_ood(run, data: ImageData, ood: Sequence[str], num_images: int | None = None, seed: int = 0,
                 extra_scores: dict[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
                 out_dir: str | Path | None = None, batch_size: int = 500, progress: bool = False) -> dict[str, Any]:
    """AUROC of each score for in-distribution = the test images of `data` against each OOD set in `ood`
    ("interp", "noise" or a data spec for hybvit.data.load_data), as Table 3 / Table 11. num_images: the first so
    many of every set; None = whole sets, the paper code's protocol.

    Scores: "logsumexp" and "max_softmax" of the run's EMA classifier (Run.classify), plus `extra_scores`,
    name -> function(images (N, C, H, W): uint8, or floats in [-1, 1] for interp) -> (N,) scores, higher = more
    in-distribution.
    Each OOD set's images come from a generator seeded by (seed, set name), so results are deterministic.

    Returns {"in_distribution": {"data", "num_images"}, "seed", "scores": [names],
             "sets": {name: {"num_images": n, "auroc": {score: value}}},
             "plots": {name: "ood_roc_<name>.png", "hist:<score>": "ood_hist_<score>.png"}} (plots with out_dir).
    """
    check_classifier(run, data, "ood")
    if not ood:
        raise HybvitError("give at least one OOD set: interp, noise or a data spec such as svhn or cifar100")
    extra_scores = dict(extra_scores or {})
    clash = [k for k in extra_scores if k in LOGIT_SCORES]
    if clash:
        raise HybvitError(f"extra score name(s) {', '.join(clash)} clash with the built-in scores; rename them")

    def scores_of(x: torch.Tensor, what: str) -> dict[str, torch.Tensor]:
        s = score_logits(run.classify(x, batch_size=batch_size))
        for name, fn in extra_scores.items():
            v = torch.as_tensor(fn(x)).detach().to("cpu", torch.float64).reshape(-1)
            if len(v) != len(x):
                raise HybvitError(f"score '{name}' returned {len(v)} values for {len(x)} {what} images")
            s[name] = v
        return s

    sets = list(dict.fromkeys(ood))
    bar = tqdm(total=1 + len(sets), unit="set", desc="OOD scores", leave=False, disable=None) if progress else None
    x_in = data.x_test[:num_images]
    s_in = scores_of(x_in, "in-distribution")
    if bar is not None:
        bar.update(1)
    names = list(s_in)
    result: dict[str, Any] = {
        "protocol": ("paper: whole test sets, interp the float mean of consecutive shuffled batches of 100, CelebA's "
                     "test split stretched" if num_images is None else
                     f"the first {num_images} images of each set; interp the float mean of consecutive shuffled "
                     f"batches of 100, CelebA's test split stretched"),
        "in_distribution": {"data": data.name, "num_images": len(x_in)}, "seed": seed, "scores": names, "sets": {}}
    all_scores: dict[str, dict[str, torch.Tensor]] = {}
    for spec in ood:
        if spec in result["sets"]:
            continue
        x_out = ood_images(data, spec, num_images, _set_generator(seed, spec))
        s_out = scores_of(x_out, f"'{spec}'")
        all_scores[spec] = s_out
        result["sets"][spec] = {"num_images": len(x_out),
                                "auroc": {k: auroc(s_in[k], s_out[k]) for k in names}}
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()

    if out_dir is not None:
        out_dir = Path(out_dir)
        plots: dict[str, str] = {}
        for spec, s_out in all_scores.items():
            curves = {f"{k} (AUROC {result['sets'][spec]['auroc'][k]:.3f})": roc_curve(s_in[k], s_out[k])
                      for k in names}
            fname = f"ood_roc_{_slug(spec)}.png"
            roc_curves(out_dir / fname, curves, title=f"in: {data.name} test ({len(x_in)}) vs OOD: {spec} "
                                                      f"({result['sets'][spec]['num_images']})")
            plots[spec] = fname
        for k in names:
            fname = f"ood_hist_{_slug(k)}.png"
            histograms(out_dir / fname, {f"{data.name} (in)": s_in[k], **{s: v[k] for s, v in all_scores.items()}},
                       xlabel=k, title=f"OOD score '{k}' (higher = more in-distribution)")
            plots[f"hist:{k}"] = fname
        result["plots"] = plots
    return result


__all__ = ["score_logits", "auroc", "roc_curve", "interp_images", "noise_images", "match_channels",
           "ood_images", "evaluate_ood", "LOGIT_SCORES"]
