"""Frechet distance between two sets of feature vectors (Heusel et al., 2017):
FD = ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^{1/2}).

On digits the features are the raw pixels in [-1, 1] (64 dimensions): "pixel-FD". Train vs test scores about
0.4 there, Gaussian noise clipped to [-1, 1] about 45.
"""
from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg
import torch

from ..data import to_float, to_uint8


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """FD between the Gaussians fitted to rows of a (N, D) and b (M, D), computed in float64."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return frechet_distance_from_stats(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


def frechet_distance_from_stats(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """FD between N(mu1, s1) and N(mu2, s2)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, dtype=np.float64)), np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    s1, s2 = np.atleast_2d(np.asarray(s1, dtype=np.float64)), np.atleast_2d(np.asarray(s2, dtype=np.float64))
    with warnings.catch_warnings():  # digits have constant (zero) border pixels: singular covariances are normal
        warnings.simplefilter("ignore")
        covmean = scipy.linalg.sqrtm(s1 @ s2)
        if not np.isfinite(covmean).all():  # regularise as pytorch-fid does
            eps = 1e-6 * np.eye(len(s1))
            covmean = scipy.linalg.sqrtm((s1 + eps) @ (s2 + eps))
    covmean = np.real(covmean)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def pixel_frechet_distance(samples: torch.Tensor, reference_uint8: torch.Tensor) -> float:
    """FD in raw pixel space: samples float in [-1, 1] (N, C, H, W) vs uint8 reference images (M, C, H, W).
    Samples are first rounded to uint8, as any saved image would be."""
    a = to_float(to_uint8(samples)).flatten(1).numpy()
    b = to_float(reference_uint8).flatten(1).numpy()
    return frechet_distance(a, b)
