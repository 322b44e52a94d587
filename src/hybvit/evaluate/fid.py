"""FID, Inception Score and the small-feature Frechet distance.

Three feature extractors, one interface (uint8 images (N, C, H, W) in, float64 features (N, D) out):

* ``inception``: the TF-Inception port of torch-fidelity (the same network as pytorch-fid and the field's FID),
  2048-d pool features for FID, the 1008 unbiased logits for IS. Weights from ``--inception-weights PATH`` or
  the usual torch hub cache; downloaded when online. On a CPU it runs ~7 images/s: a 10k FID belongs on a GPU.
* ``small``: a fixed random convolutional network (weights drawn from numpy's seeded generator, so the same on
  every machine and torch version), 256-d features at 32x32. Cheap on a CPU; its distances are comparable only
  with each other, never with published FIDs. Used by the CPU demonstrations and tests.
* ``pixel``: raw pixels in [-1, 1] (``pixel-fd``; sensible for 8x8 digits only).

Reference statistics (mean and covariance of the training set's features) are cached per dataset and extractor
under ``$HYBVIT_CACHE`` (default ``~/.cache/hybvit``). Generated images are rounded to uint8 before features are
taken, as a saved PNG would be.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import distributed
from ..data import cache_dir
from ..errors import HybvitError
from .frechet import frechet_distance_from_stats

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_FILE


class SmallFeatures(torch.nn.Module):
    """A fixed random CNN: 3x3 conv 64 -> conv 128 (stride 2) -> conv 256 (stride 2), ReLU, then the spatial mean
    and standard deviation of the last map (512-d). He-normal weights from numpy's generator (seed 0)."""
    name = "small"

    def __init__(self, channels: int = 3, seed: int = 0):
        super().__init__()
        rng = np.random.default_rng(seed)
        shapes = [(64, 3, 3, 3), (128, 64, 3, 3), (256, 128, 3, 3)]
        self.weights = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.from_numpy(rng.normal(0, np.sqrt(2 / np.prod(s[1:])), s)).float(),
                                requires_grad=False) for s in shapes])
        self.requires_grad_(False)

    @torch.no_grad()
    def forward(self, x_uint8: torch.Tensor) -> torch.Tensor:
        x = x_uint8.float() / 127.5 - 1                                 # (B, C, H, W) in [-1, 1]
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
        for i, w in enumerate(self.weights):
            x = F.relu(F.conv2d(x, w, stride=1 if i == 0 else 2, padding=1))   # 32 -> 32 -> 16 -> 8
        return torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)               # (B, 512)


class InceptionFeatures(torch.nn.Module):
    """torch-fidelity's FeatureExtractorInceptionV3: returns (pool features (B, 2048), logits (B, 1008))."""
    name = "inception"

    def __init__(self, weights: str | None = None):
        super().__init__()
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ImportError:
            raise HybvitError("metrics 'fid' and 'is' need torch-fidelity: pip install 'hybvit[fid]' "
                              "(or use --metrics small-fd on a CPU)") from None
        path = weights or _cached_inception()
        if weights and not Path(weights).is_file():
            raise HybvitError(f"--inception-weights '{weights}' is not a file; download {INCEPTION_URL}")
        if path is None and os.environ.get("HYBVIT_NO_DOWNLOAD"):
            raise HybvitError(_no_weights_message())
        if path is not None:
            _check_plain_tensors(path)
        try:
            self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                                   feature_extractor_weights_path=path)
        except OSError as e:  # URLError and friends: offline without the file
            raise HybvitError(f"{_no_weights_message()} ({type(e).__name__})") from None
        self.net.eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, x_uint8: torch.Tensor):
        if x_uint8.shape[1] == 1:
            x_uint8 = x_uint8.expand(-1, 3, -1, -1)
        pool, logits = self.net(x_uint8.contiguous())
        return pool, logits


def _cached_inception() -> str | None:
    hub = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch")) / "hub" / "checkpoints" / INCEPTION_FILE
    return str(hub) if hub.is_file() else None


def _check_plain_tensors(path: str) -> None:
    """torch-fidelity loads the file with weights_only=False; refuse any file that is more than tensors first, so
    loading it can never run pickled code."""
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise HybvitError(f"'{path}' is not a plain tensor file ({type(e).__name__}); download {INCEPTION_URL}") from None


def _no_weights_message() -> str:
    return (f"the Inception weights are not available offline; download {INCEPTION_URL} and pass "
            f"--inception-weights PATH (or put it in $TORCH_HOME/hub/checkpoints/)")


def extract(extractor: torch.nn.Module, images_uint8: torch.Tensor, device, batch_size: int = 250,
            want_logits: bool = False, progress: bool = False):
    """Features (N, D) float64 numpy (and the logits when asked, for IS) of uint8 images, in batches; a progress
    bar (on a terminal) when asked."""
    extractor = extractor.to(device)
    count = -(-len(images_uint8) // batch_size)
    bar = tqdm(total=len(distributed.my_batches(count)), desc=f"{extractor.name} features of {len(images_uint8)} "
               f"images", unit="batch", leave=False, mininterval=1.0, disable=None) if progress else None

    def one(start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = extractor(images_uint8[start:stop].to(device))
        out, lg = out if isinstance(out, tuple) else (out, None)
        if bar is not None:
            bar.update(1)
        return out.double().cpu(), (lg.double().cpu() if lg is not None else None)
    parts = distributed.map_batches(len(images_uint8), batch_size, one)   # split over the ranks in shared_work
    if bar is not None:
        bar.close()
    f = torch.cat([p[0] for p in parts]).numpy()
    return (f, torch.cat([p[1] for p in parts]).numpy()) if want_logits else f


def stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return features.mean(0), np.cov(features, rowvar=False)


def _cache_path(kind: str, extractor: torch.nn.Module, data, x: torch.Tensor) -> Path:
    """Where statistics or features of images x of a dataset are cached: a key made of the dataset, its content,
    the extractor and the count."""
    digest = hashlib.sha1(x[:: max(1, len(x) // 512)].numpy().tobytes()).hexdigest()[:12]
    name = f"{data.name.replace(':', '_').replace('/', '_')}-{extractor.name}-{len(x)}-{digest}.npz"
    return cache_dir() / kind / name


def _save_npz(path: Path, **arrays: Any) -> None:
    """Write the cache file `path` through a temporary file of its own (ranks of one job, on one or several nodes,
    may write it side by side: the last rename wins, and every version is whole)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp.npz", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def reference_stats(extractor: torch.nn.Module, data, device, num_images: int = 0, batch_size: int = 250,
                    use_cache: bool = True, progress: bool = False) -> dict[str, Any]:
    """Mean and covariance of the training images' features (all of them, or the first num_images), cached on
    disk (see _cache_path)."""
    x = data.x_train if not num_images else data.x_train[:num_images]
    path = _cache_path("fid-stats", extractor, data, x)
    if use_cache and distributed.everywhere(path.exists):          # under torchrun: a hit for every rank or none
        with np.load(path) as z:
            return {"mu": z["mu"], "sigma": z["sigma"], "num_images": int(z["n"]), "cache": str(path), "cached": True}
    mu, sigma = stats(extract(extractor, x, device, batch_size, progress=progress))
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        _save_npz(path, mu=mu, sigma=sigma, n=len(x))
    return {"mu": mu, "sigma": sigma, "num_images": len(x), "cache": str(path) if use_cache else None,
            "cached": False}


def reference_features(extractor: torch.nn.Module, data, x: torch.Tensor, device, progress: bool = False
                       ) -> tuple[np.ndarray, str]:
    """Features (float32) of reference images x (of `data`, for KID and precision/recall, which need the features
    themselves), cached on disk like the statistics; returns them and the cache file."""
    path = _cache_path("features", extractor, data, x)
    if distributed.everywhere(path.exists):
        with np.load(path) as z:
            return z["features"], str(path)
    out = extract(extractor, x, device, progress=progress)
    feats = (out[0] if isinstance(out, tuple) else out).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    _save_npz(path, features=feats)
    return feats, str(path)


def kernel_inception_distance(generated: np.ndarray, reference: np.ndarray, seed: int = 0) -> dict[str, float]:
    """KID (Binkowski et al., 2018): the unbiased MMD^2 with the cubic polynomial kernel, mean and std over 100
    random subsets of min(1000, N) features each, computed by torch-fidelity."""
    from torch_fidelity.metric_kid import kid_features_to_metric
    size = min(1000, len(generated), len(reference))
    r = kid_features_to_metric(torch.from_numpy(np.asarray(generated, np.float64)),
                               torch.from_numpy(np.asarray(reference, np.float64)),
                               kid_subsets=100, kid_subset_size=size, rng_seed=seed, verbose=False)
    return {"value": r["kernel_inception_distance_mean"], "std": r["kernel_inception_distance_std"],
            "subsets": 100, "subset_size": size}


def precision_recall(generated: np.ndarray, reference: np.ndarray, k: int = 3) -> dict[str, float]:
    """Improved precision and recall (Kynkaanniemi et al., 2019) with k-nearest-neighbour balls (k = 3), computed
    by torch-fidelity on the features given (here Inception pool3, as the ADM evaluation suite uses)."""
    from torch_fidelity.metric_prc import prc_features_to_metric
    r = prc_features_to_metric(torch.from_numpy(np.asarray(generated, np.float32)),
                               torch.from_numpy(np.asarray(reference, np.float32)),
                               prc_neighborhood=k, prc_batch_size=10000, save_cpu_ram=False, verbose=False)
    return {"precision": r["precision"], "recall": r["recall"], "f_score": r["f_score"], "neighbourhood": k}


def frechet_to_reference(features: np.ndarray, ref: dict[str, Any]) -> float:
    mu, sigma = stats(features)
    return frechet_distance_from_stats(mu, sigma, ref["mu"], ref["sigma"])


def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """IS = exp(E_x KL(p(y|x) || p(y))) (Salimans et al., 2016), mean and std over `splits` equal parts."""
    p = torch.softmax(torch.from_numpy(logits).double(), 1).numpy()
    scores = []
    for part in np.array_split(p, splits):
        py = part.mean(0, keepdims=True)
        kl = (part * (np.log(part + 1e-12) - np.log(py + 1e-12))).sum(1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))
