"""`hybvit evaluate`: one module per metric family; this file checks the request, dispatches, and writes the report.

    hybvit evaluate --run DIR --metrics accuracy,fid,bpd,ece,ood,pgd --out report.json

writes report.json, report-plots/ (PNG files) and report.html (self-contained: config, training curves, sample
grids, every metric and plot). The same checkpoint and seed give the same numbers every time.
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

from ..checkpoint import load_training_state, write_json
from ..data import to_float, to_uint8
from ..datasets import load_data
from ..errors import HybvitError
from ..likelihood import bits_per_dim
from ..model import ViT
from ..sample import check_weights_fit, eps_function, load_run
from .accuracy import evaluate_accuracy
from .bpd import evaluate_bpd
from .calibration import evaluate_ece
from .fid import InceptionFeatures, SmallFeatures, extract, frechet_to_reference, inception_score, reference_stats, stats
from .frechet import pixel_frechet_distance
from .ood import evaluate_ood
from .report import training_curves, write_html
from .robustness import evaluate_pgd
from .sample_analysis import analyse_samples
from .speed import sampling_speed, training_speed

METRICS = ("accuracy", "fid", "is", "small-fd", "pixel-fd", "bpd", "ece", "ood", "pgd", "sample-analysis", "speed")
_NEEDS_CLASSIFIER = {"accuracy", "ece", "ood", "pgd", "sample-analysis"}
_NEEDS_GENERATOR = {"fid", "is", "small-fd", "pixel-fd", "bpd", "sample-analysis"}


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
    bpd_images: int = 1000
    bpd_timesteps: int = 0               # 0 = the full bound over all T steps; K = unbiased estimate, K per image
    ece_bins: list[int] = field(default_factory=lambda: [15, 20])
    ood: list[str] = field(default_factory=lambda: ["interp", "noise"])
    ood_images: int = 1000
    ood_bpd: bool = True                 # also score OOD by the diffusion bits/dim (needs a generative run)
    pgd_norms: list[str] = field(default_factory=lambda: ["linf", "l2"])
    pgd_images: int = 1000
    pgd_steps: int = 50
    pgd_step_factor: float = 2.5         # step size = factor * eps / steps
    pgd_eps: dict[str, list[float]] | None = None   # per norm, in /255; None = the paper's Table 12 lists
    speed_samples: int = 32
    html: bool = True


def parse_metrics(text: str, mode: str | None = None) -> list[str]:
    """'a,b,c' -> a list of known metric names; 'all' -> every metric that applies to `mode`."""
    names = [m.strip() for m in text.split(",") if m.strip()]
    if names == ["all"]:
        if mode is None:
            return list(METRICS)
        return [m for m in METRICS if _applies(m, mode) and m not in ("fid", "is")]
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


def evaluate_run(run_dir: Path, metrics: list[str], out: Path | None = None, opts: EvalOptions | None = None,
                 **kw) -> dict[str, Any]:
    """Compute `metrics` for the run in run_dir. With `out` (a .json path) also writes the plots and HTML report;
    nothing is left behind when a metric fails."""

    opts = opts or EvalOptions(**kw)
    run = load_run(run_dir, device=opts.device)
    cfg = run.config
    for m in metrics:
        if not _applies(m, cfg.train.mode):
            need = "a classifier" if m in _NEEDS_CLASSIFIER else "a generative model"
            raise HybvitError(f"metric '{m}' needs {need}; this run was trained in {cfg.train.mode} mode")
    data = load_data(opts.data_spec or cfg.data.spec, cfg.data.image_size)
    if (data.channels, data.image_size) != (cfg.model.channels, cfg.model.image_size):
        raise HybvitError(f"data '{data.name}' is {data.image_size}x{data.image_size}x{data.channels} but the model "
                          f"takes {cfg.model.image_size}x{cfg.model.image_size}x{cfg.model.channels}; use matching --data")
    if set(metrics) & _NEEDS_CLASSIFIER and data.num_classes != cfg.model.num_classes:
        raise HybvitError(f"data has {data.num_classes} classes but the model {cfg.model.num_classes}; "
                          f"evaluate on the data the run was trained on")

    work = None
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".hybvit-eval-", dir=out.parent))
    report: dict[str, Any] = {"run": str(run_dir), "data": data.name, "mode": cfg.train.mode, "preset": cfg.preset,
                              "seed": opts.seed, "device": str(run.device), "metrics": {}, "seconds": {}}
    try:
        for name in metrics:
            t0 = time.time()
            print(f"evaluating {name} ...", flush=True)
            report["metrics"][name] = _metric(name, run, Path(run_dir), data, opts, work)
            report["seconds"][name] = round(time.time() - t0, 2)
        if out is not None:
            _finish(report, Path(run_dir), run, out, work, opts)
    except BaseException:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
        raise
    return report


def _metric(name: str, run, run_dir: Path, data, opts: EvalOptions, work: Path | None) -> dict[str, Any]:
    cfg = run.config
    n_gen = opts.num_samples
    if name == "accuracy":
        raw = None
        last = run_dir / "checkpoints" / "last.pt"
        if last.exists():
            weights = load_training_state(last)["model"]
            check_weights_fit(cfg, weights, last)
            raw = ViT(cfg.model)
            raw.load_state_dict(weights)
            raw.to(run.device).eval()
        return evaluate_accuracy(run, data, raw, opts.batch_size)
    if name in ("fid", "is", "small-fd"):
        return _fid_family(name, run, data, opts, n_gen or (10_000 if name != "small-fd" else 1000), work)
    if name == "pixel-fd":
        n = n_gen or 1000
        x = run.sample(n, **_sampling(opts))
        return {"value": pixel_frechet_distance(x, data.x_test), "num_samples": n, "reference": "test set",
                "features": "raw pixels in [-1, 1]", **_sampler_info(run, opts)}
    if name == "bpd":
        return evaluate_bpd(run, data.x_test, num_images=opts.bpd_images, timesteps=opts.bpd_timesteps or None,
                            batch_size=opts.batch_size, seed=opts.seed, progress=True)
    if name == "ece":
        return evaluate_ece(run, data, n_bins_list=tuple(opts.ece_bins), out_dir=work)
    if name == "ood":
        extra = None
        if opts.ood_bpd and cfg.train.mode == "hybvit":
            extra = {"bits_per_dim (negated)": _bpd_score(run, opts)}
        return evaluate_ood(run, data, opts.ood, num_images=opts.ood_images, seed=opts.seed, extra_scores=extra,
                            out_dir=work)
    if name == "pgd":
        return evaluate_pgd(run, data, norms=tuple(opts.pgd_norms), eps=opts.pgd_eps, num_images=opts.pgd_images,
                            steps=opts.pgd_steps, seed=opts.seed, batch_size=min(opts.batch_size, 250), out_dir=work,
                            step_size_factor=opts.pgd_step_factor)
    if name == "sample-analysis":
        return analyse_samples(run, data, num_samples=n_gen or 1000, sampler=opts.sampler, steps=opts.steps,
                               seed=opts.seed, batch_size=opts.batch_size, out_dir=work)
    if name == "speed":
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
    def score(x_uint8: torch.Tensor) -> torch.Tensor:
        out = []
        for i in range(0, len(x_uint8), opts.batch_size):
            g = torch.Generator().manual_seed(opts.seed + i)
            x0 = to_float(x_uint8[i:i + opts.batch_size]).to(run.device)
            r = bits_per_dim(run.diffusion, eps_model, x0, generator=g, timesteps=opts.bpd_timesteps or 50)
            out.append(-r["total"].double().cpu())
        return torch.cat(out)
    return score


def _fid_family(name: str, run, data, opts: EvalOptions, n: int, work: Path | None) -> dict[str, Any]:
    extractor = SmallFeatures() if name == "small-fd" else InceptionFeatures(opts.inception_weights)
    x = to_uint8(run.sample(n, progress=True, **_sampling(opts)))
    feats = extract(extractor, x, run.device, want_logits=(name == "is"))
    if name == "is":
        mean, std = inception_score(feats[1])
        return {"value": mean, "std": std, "splits": 10, "num_samples": n, **_sampler_info(run, opts)}
    if opts.fid_reference == "train":
        ref = reference_stats(extractor, data, run.device)
        ref_name = f"training set ({ref['num_images']} images)"
    else:
        mu, sigma = stats(extract(extractor, data.x_test, run.device))
        ref, ref_name = {"mu": mu, "sigma": sigma, "cache": None}, f"test set ({len(data.x_test)} images)"
    value = frechet_to_reference(feats, ref)
    label = "FID (Inception pool3, 2048-d)" if name == "fid" else "small-feature FD (fixed random CNN, 512-d)"
    return {"value": value, "features": label, "num_samples": n, "reference": ref_name,
            "reference_cache": ref.get("cache"), **_sampler_info(run, opts)}


def _finish(report: dict[str, Any], run_dir: Path, run, out: Path, work: Path, opts: EvalOptions) -> None:
    """Training curves, then move the plots next to the JSON and write JSON + HTML (atomically)."""
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
        write_html(out.with_suffix(".html"), report, run_dir, run.config, plots_dir)


__all__ = ["METRICS", "EvalOptions", "evaluate_run", "parse_metrics"]
