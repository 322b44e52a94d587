"""`hybvit evaluate`: one module per metric family; this file checks the request, dispatches, and writes the report.

    hybvit evaluate --run DIR --metrics accuracy,fid,bpd,ece,ood,pgd --out report.json
    hybvit evaluate --samples s.npz --data cifar10 --metrics fid,kid,prc --out report.json   # any model's samples

writes report.json, report-plots/ (PNG files) and report.html (self-contained: config, training curves, sample
grids, every metric and plot). Every sample metric of one report uses one sample set: read from --samples, or drawn
once with every sampling flag; the report's "samples" entry says which. The same checkpoint and seed give the same
numbers every time.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import distributed
from ..checkpoint import load_training_state, write_json
from ..data import to_float
from ..datasets import load_data
from ..errors import HybvitError
from ..likelihood import bits_per_dim
from ..model import ViT
from ..precision import resolve_device
from ..provenance import provenance
from ..sample import check_weights_fit, eps_function, load_run
from ..samplefiles import read_samples
from .accuracy import evaluate_accuracy
from .bpd import evaluate_bpd
from .calibration import evaluate_ece
from .fid import (InceptionFeatures, SmallFeatures, extract, frechet_to_reference, inception_score,
                  kernel_inception_distance, precision_recall, reference_features, reference_stats, stats)
from .frechet import pixel_frechet_distance
from .ood import evaluate_ood
from .report import training_curves, write_html
from .robustness import evaluate_pgd
from .sample_analysis import analyse_samples
from .speed import sampling_speed, training_speed

METRICS = ("accuracy", "fid", "is", "kid", "prc", "small-fd", "pixel-fd", "bpd", "ece", "ood", "pgd",
           "sample-analysis", "speed")
SAMPLE_METRICS = ("fid", "is", "kid", "prc", "small-fd", "pixel-fd", "sample-analysis")   # of one sample set
INCEPTION_METRICS = ("fid", "is", "kid", "prc")          # Inception features: a GPU, and weights to load
_NEEDS_CLASSIFIER = {"accuracy", "ece", "ood", "pgd", "sample-analysis"}
_NEEDS_GENERATOR = {"fid", "is", "kid", "prc", "small-fd", "pixel-fd", "bpd", "sample-analysis"}


@dataclass
class EvalOptions:
    """Everything `hybvit evaluate` can be told; the defaults are the paper's protocol where it has one."""
    data_spec: str | None = None
    num_samples: int | None = None       # generated images for fid / is (default 10,000) and the FDs (1,000)
    sampler: str = "ddim"
    steps: int = 50
    eta: float = 0.0                     # ddim only: 0 deterministic, 1 as stochastic as the ancestral sampler
    eps_scale: float = 1.0               # epsilon scaling of the predicted noise (sample.eps_function; 1 = off)
    balance_classes: bool = False        # generated sets hold each class equally, by the run's classifier
    cfg_scale: float = 1.0               # classifier-free guidance of a class-conditional run (1 = off)
    order: int = 2                       # dpm-solver++ only
    spacing: str = "logsnr"              # dpm-solver++ only
    seed: int = 0
    batch_size: int = 500
    device: str = "auto"
    inception_weights: str | None = None
    fid_reference: str = "train"         # train | test
    bpd_images: int | None = None        # None: the whole test set (the paper's protocol)
    bpd_timesteps: int = 0               # 0 = the full bound over all T steps; K = unbiased estimate, K per image
    ece_bins: list[int] = field(default_factory=lambda: [15, 20])
    ood: list[str] = field(default_factory=lambda: ["interp", "noise"])
    ood_images: int | None = None        # None: whole sets (the paper's protocol)
    ood_bpd: bool = True                 # also score OOD by the diffusion bits/dim (needs a generative run)
    pgd_norms: list[str] = field(default_factory=lambda: ["linf", "l2"])
    pgd_images: int = 1000
    pgd_steps: int = 50
    pgd_step_factor: float | None = None  # None: the paper protocol (step 20/255, every iterate); F: step F * eps
                                          # / steps, the last iterate (robustness.py)
    pgd_eps: dict[str, list[float]] | None = None   # per norm, in /255; None = the paper's Table 12 lists
    speed_samples: int = 32
    html: bool = True
    progress: bool = True                # progress bars (on a terminal)


def parse_metrics(text: str, mode: str | None = None, samples_only: bool = False) -> list[str]:
    """'a,b,c' -> a list of known metric names; 'all' -> every metric that applies to `mode` (samples_only: to a
    sample file without a run)."""
    names = [m.strip() for m in text.split(",") if m.strip()]
    if names == ["all"]:
        if samples_only:
            return ["small-fd", "pixel-fd"]
        if mode is None:
            return list(METRICS)
        return [m for m in METRICS if _applies(m, mode) and m not in INCEPTION_METRICS]
    unknown = [m for m in names if m not in METRICS]
    if unknown or not names:
        raise HybvitError(f"unknown metric(s) {', '.join(unknown) or '(none given)'}; choose from "
                          f"{', '.join(METRICS)} or all")
    return names


def _applies(metric: str, mode: str) -> bool:
    if metric in _NEEDS_CLASSIFIER and mode == "genvit":
        return False
    if metric in _NEEDS_GENERATOR and mode == "vit":
        return False
    return True


def evaluate_run(run_dir: Path | None, metrics: list[str], out: Path | None = None, opts: EvalOptions | None = None,
                 samples: Path | None = None, **kw) -> dict[str, Any]:
    """Compute `metrics` for the run in run_dir and/or the sample file or folder `samples` (then the sample metrics
    score those images, from any model). With `out` (a .json path) also writes the plots and HTML report; nothing is
    left behind when a metric fails."""
    opts = opts or EvalOptions(**kw)
    if run_dir is None and samples is None:
        raise HybvitError("give --run DIR, --samples FILE.npz|DIR, or both")
    ctx = distributed.context()                  # torchrun: every rank runs this, rank 0 alone prints
    run = load_run(run_dir, device=opts.device) if run_dir is not None else None
    cfg = run.config if run is not None else None
    device = run.device if run is not None else resolve_device(opts.device)
    for m in metrics:
        if samples is not None and m in SAMPLE_METRICS and m != "sample-analysis":
            continue                                       # scores the file: no model needed
        if run is None:
            raise HybvitError(f"metric '{m}' needs a model: add --run DIR (with --samples alone: "
                              f"{', '.join(s for s in SAMPLE_METRICS if s != 'sample-analysis')})")
        if not _applies(m, cfg.train.mode) and not (m == "sample-analysis" and samples is not None
                                                     and cfg.train.mode != "genvit"):
            need = "a classifier" if m in _NEEDS_CLASSIFIER else "a generative model"
            raise HybvitError(f"metric '{m}' needs {need}; this run was trained in {cfg.train.mode} mode")
    spec = opts.data_spec or (cfg.data.spec if cfg is not None else None)
    if spec is None and set(metrics) != {"is"}:
        raise HybvitError("--samples without --run needs --data SPEC: the dataset the samples are compared with "
                          "(e.g. cifar10, npz:PATH)")
    data = load_data(spec, cfg.data.image_size if cfg is not None else 0) if spec is not None else None
    if cfg is not None and data is not None:
        if (data.channels, data.image_size) != (cfg.model.channels, cfg.model.image_size):
            raise HybvitError(f"data '{data.name}' is {data.image_size}x{data.image_size}x{data.channels} but the "
                              f"model takes {cfg.model.image_size}x{cfg.model.image_size}x{cfg.model.channels}; "
                              f"use matching --data")
        if set(metrics) & _NEEDS_CLASSIFIER and data.num_classes != cfg.model.num_classes:
            raise HybvitError(f"data has {data.num_classes} classes but the model {cfg.model.num_classes}; "
                              f"evaluate on the data the run was trained on")
    sample_set = None
    if set(metrics) & set(SAMPLE_METRICS):
        sample_set = SampleSet.make(run, samples, opts, metrics, data, device)

    work = None
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".hybvit-eval-", dir=out.parent))
    report: dict[str, Any] = {"run": str(run_dir) if run_dir is not None else None,
                              "data": data.name if data is not None else None,
                              "mode": cfg.train.mode if cfg is not None else None,
                              "preset": cfg.preset if cfg is not None else None, "seed": opts.seed,
                              "device": str(device),
                              "samples": sample_set.info if sample_set is not None else None,
                              "metrics": {}, "seconds": {},
                              "provenance": provenance(device, ctx.world, cfg.train.amp if cfg is not None else None)}
    try:
        for name in metrics:
            t0 = time.time()
            if ctx.main:
                print(f"evaluating {name} ...", flush=True)
            report["metrics"][name] = _metric(name, run, run_dir and Path(run_dir), data, opts, work, sample_set)
            report["seconds"][name] = round(time.time() - t0, 2)
        if out is not None:
            _finish(report, run_dir and Path(run_dir), run, out, work, opts)
    except BaseException:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
        raise
    return report


class SampleSet:
    """The one set of images every sample metric of a report scores (uint8 (N, C, H, W)), with what it is (info),
    and its features per extractor, computed once and shared (FID, IS, KID and precision/recall use the same
    Inception features)."""

    def __init__(self, images: torch.Tensor, info: dict[str, Any], device, progress: bool):
        self.images, self.info, self.device, self.progress = images, info, device, progress
        self._features: dict[str, Any] = {}

    @classmethod
    def make(cls, run, samples: Path | None, opts: EvalOptions, metrics: list[str], data, device) -> "SampleSet":
        if samples is not None:
            x, _ = read_samples(samples)
            if opts.num_samples is not None:
                if opts.num_samples > len(x):
                    raise HybvitError(f"--num-samples {opts.num_samples}, but '{samples}' holds {len(x)} images")
                x = x[:opts.num_samples]
            info = {"source": str(samples), "num_samples": len(x)}
        else:
            n = opts.num_samples or (10_000 if set(metrics) & set(INCEPTION_METRICS) else 1000)
            x = run.sample(n, progress=opts.progress, uint8=True, **_sampling(opts))
            info = {"source": "drawn by this evaluation", "num_samples": n, **_sampler_info(run, opts)}
        if run is not None and x.shape[1:] != (run.config.model.channels, run.config.model.image_size,
                                               run.config.model.image_size) and "sample-analysis" in metrics:
            raise HybvitError(f"samples are {tuple(x.shape[1:])} (C,H,W) but the run's classifier takes "
                              f"{(run.config.model.channels, run.config.model.image_size, run.config.model.image_size)}")
        if data is not None and "pixel-fd" in metrics and x.shape[1:] != data.x_test.shape[1:]:
            raise HybvitError(f"pixel-fd compares pixels: the samples are {tuple(x.shape[1:])} (C,H,W) but "
                              f"'{data.name}' is {tuple(data.x_test.shape[1:])}; give matching --data")
        return cls(x, info, device, opts.progress)

    def features(self, extractor) -> Any:
        if extractor.name not in self._features:
            self._features[extractor.name] = extract(extractor, self.images, self.device,
                                                     want_logits=extractor.name == "inception", progress=self.progress)
        return self._features[extractor.name]


def _metric(name: str, run, run_dir: Path | None, data, opts: EvalOptions, work: Path | None,
            sample_set: SampleSet | None) -> dict[str, Any]:
    if name == "accuracy":
        raw = None
        last = run_dir / "checkpoints" / "last.pt"
        if last.exists():
            weights = load_training_state(last)["model"]
            check_weights_fit(run.config, weights, last)
            raw = ViT(run.config.model)
            raw.load_state_dict(weights)
            raw.to(run.device).eval()
        return evaluate_accuracy(run, data, raw, opts.batch_size)
    if name in ("fid", "is", "kid", "prc", "small-fd"):
        return _feature_metric(name, sample_set, data, opts)
    if name == "pixel-fd":
        return {"value": pixel_frechet_distance(to_float(sample_set.images), data.x_test),
                "num_samples": len(sample_set.images), "reference": "test set", "features": "raw pixels in [-1, 1]"}
    if name == "bpd":
        return evaluate_bpd(run, data.x_test, num_images=opts.bpd_images, timesteps=opts.bpd_timesteps or None,
                            batch_size=opts.batch_size, seed=opts.seed, progress=opts.progress)
    if name == "ece":
        return evaluate_ece(run, data, n_bins_list=tuple(opts.ece_bins), out_dir=work)
    if name == "ood":
        extra = None
        if opts.ood_bpd and run.config.train.mode == "hybvit":
            extra = {"bits_per_dim (negated)": _bpd_score(run, opts)}
        return evaluate_ood(run, data, opts.ood, num_images=opts.ood_images, seed=opts.seed, extra_scores=extra,
                            out_dir=work, progress=opts.progress)
    if name == "pgd":
        return evaluate_pgd(run, data, norms=tuple(opts.pgd_norms), eps=opts.pgd_eps, num_images=opts.pgd_images,
                            steps=opts.pgd_steps, seed=opts.seed, batch_size=min(opts.batch_size, 250), out_dir=work,
                            step_size_factor=opts.pgd_step_factor, progress=opts.progress)
    if name == "sample-analysis":
        return analyse_samples(run, data, sample_set.images, batch_size=opts.batch_size, out_dir=work)
    if name == "speed":
        cfg = run.config
        samplers = [("dpm-solver++", 10), ("dpm-solver++", 20), ("ddim", 20), ("ddim", 50)]
        if cfg.train.mode == "vit":
            return {"training": training_speed(run_dir, cfg, len(data.x_train))}
        return {"training": training_speed(run_dir, cfg, len(data.x_train)),
                "sampling": sampling_speed(run, samplers + [("ancestral", 0)], num_samples=opts.speed_samples,
                                           seed=opts.seed, batch_size=opts.batch_size)}
    raise HybvitError(f"unknown metric '{name}'")


def _sampling(opts: EvalOptions) -> dict[str, Any]:
    return dict(sampler=opts.sampler, steps=opts.steps, eta=opts.eta, seed=opts.seed, batch_size=opts.batch_size,
                order=opts.order, spacing=opts.spacing, eps_scale=opts.eps_scale, balance_classes=opts.balance_classes,
                cfg_scale=opts.cfg_scale)


def _sampler_info(run, opts: EvalOptions) -> dict[str, Any]:
    info = {"sampler": opts.sampler, "steps": run.diffusion.T if opts.sampler == "ancestral" else opts.steps}
    if opts.sampler == "dpm-solver++":
        info.update(order=opts.order, spacing=opts.spacing)
    if opts.sampler == "ddim":
        info.update(eta=opts.eta)
    if opts.eps_scale != 1.0:
        info.update(eps_scale=opts.eps_scale)
    if opts.balance_classes:
        info.update(balance_classes=True)
    if run.config.model.class_cond:                       # the denoiser is asked for class i mod K
        info.update(labels="sample i: class i mod K", cfg_scale=opts.cfg_scale)
    return info


def _bpd_score(run, opts: EvalOptions):
    """OOD score from the diffusion: minus the bits/dim bound (an unbiased estimate over 50 random timesteps per
    image when the full bound is not asked for; the same timesteps for in- and out-of-distribution images)."""
    # eps (v-prediction runs converted)
    eps_model = eps_function(run.model, run.diffusion, run.config.train.amp, run.device)

    @torch.no_grad()
    def score(x: torch.Tensor) -> torch.Tensor:              # uint8, or floats in [-1, 1] (interp)
        def one(start: int, stop: int) -> torch.Tensor:
            g = torch.Generator().manual_seed(opts.seed + start)
            part = x[start:stop]
            x0 = (part.float() if part.is_floating_point() else to_float(part)).to(run.device)
            r = bits_per_dim(run.diffusion, eps_model, x0, generator=g, timesteps=opts.bpd_timesteps or 50)
            return -r["total"].double().cpu()
        return torch.cat(distributed.map_batches(len(x), opts.batch_size, one))
    return score


def _feature_metric(name: str, sample_set: SampleSet, data, opts: EvalOptions) -> dict[str, Any]:
    """fid, is, kid, prc (Inception features) and small-fd (the fixed random CNN) of the report's sample set."""
    extractor = SmallFeatures() if name == "small-fd" else InceptionFeatures(opts.inception_weights)
    feats = sample_set.features(extractor)
    n = len(sample_set.images)
    if name == "is":
        mean, std = inception_score(feats[1])
        return {"value": mean, "std": std, "splits": 10, "num_samples": n}
    pool = feats[0] if isinstance(feats, tuple) else feats
    ref_images = data.x_train if opts.fid_reference == "train" else data.x_test
    which = "training set" if opts.fid_reference == "train" else "test set"
    if name in ("kid", "prc"):                 # the features themselves: as many reference images as samples
        x_ref = ref_images[:n]
        ref_feats, cache = reference_features(extractor, data, x_ref, sample_set.device, progress=opts.progress)
        result = (kernel_inception_distance(pool, ref_feats, seed=opts.seed) if name == "kid"
                  else precision_recall(pool, ref_feats))
        return {**result, "features": "Inception pool3 (2048-d)", "num_samples": n,
                "reference": f"{which} (first {len(x_ref)} images)", "reference_cache": cache}
    if opts.fid_reference == "train":
        ref = reference_stats(extractor, data, sample_set.device, progress=opts.progress)
        ref_name = f"training set ({ref['num_images']} images)"
    else:
        mu, sigma = stats(extract(extractor, data.x_test, sample_set.device, progress=opts.progress))
        ref, ref_name = {"mu": mu, "sigma": sigma, "cache": None}, f"test set ({len(data.x_test)} images)"
    value = frechet_to_reference(pool, ref)
    label = "FID (Inception pool3, 2048-d)" if name == "fid" else "small-feature FD (fixed random CNN, 512-d)"
    return {"value": value, "features": label, "num_samples": n, "reference": ref_name,
            "reference_cache": ref.get("cache")}


def _finish(report: dict[str, Any], run_dir: Path | None, run, out: Path, work: Path, opts: EvalOptions) -> None:
    """Training curves (with a run), then move the plots next to the JSON and write JSON + HTML (atomically)."""
    if run_dir is not None:
        try:
            report["training_curves"] = training_curves(run_dir, work)
        except HybvitError as e:
            report["training_curves"] = {"note": str(e)}
    plots_dir = out.with_name(out.stem + "-plots")
    if plots_dir.exists():
        shutil.rmtree(plots_dir)
    os.replace(work, plots_dir)
    report["plots_dir"] = plots_dir.name
    write_json(out, report)
    if opts.html:
        write_html(out.with_suffix(".html"), report, run_dir, run.config if run is not None else None, plots_dir)


__all__ = ["METRICS", "SAMPLE_METRICS", "EvalOptions", "evaluate_run", "parse_metrics"]
