"""The `sample` and `evaluate` commands of `hybvit`: their flags, the checks on them, and the runs.
cli.py builds the parser with add_sample_parser and add_evaluate_parser and dispatches to cmd_sample and
cmd_evaluate; this module does not import cli.py."""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from . import checkpoint as ckpt
from . import distributed
from .config import check_device
from .data import to_float, to_uint8
from .errors import HybvitError
from .evaluate import EvalOptions, evaluate_run, parse_metrics
from .evaluate.report import summary_lines
from .evaluate.robustness import PAPER_EPS
from .guidance import sample_class
from .precision import resolve_device
from .sample import (draw_samples, gather_samples, load_run, load_run_config, make_grid, run_from_weights, save_png)
from .samplefiles import is_folder, write_samples


def add_sample_parser(sub) -> None:
    """The flags of `hybvit sample`."""
    s = sub.add_parser("sample", help="draw samples from a trained run")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="a run directory")
    src.add_argument("--checkpoint", help="a checkpoint file (.safetensors or last.pt)")
    s.add_argument("--num", type=int, required=True, help="number of samples")
    s.add_argument("--out", required=True,
                   help="FILE.png (a grid), FILE.npz (arr_0: uint8 images (N,H,W,C), arr_1: labels; the ADM "
                        "evaluation suite's format) or DIR/ (numbered PNGs, as pytorch-fid and clean-fid read)")
    add_sampling_flags(s)
    s.add_argument("--class", dest="label", type=int, metavar="K",
                   help="HybViT only: steer every sample toward class K with the model's own classifier (a "
                        "class-conditional run also asks its denoiser for K)")
    s.add_argument("--guidance-scale", type=float, default=None, metavar="S",
                   help="strength of --class guidance (default 32; 0 = unguided)")
    s.add_argument("--guidance-through", default="denoiser", choices=["denoiser", "classifier"],
                   help="--class guidance gradient: through the denoiser too (default, better samples) or through "
                        "the classifier only (cheaper)")
    s.add_argument("--batch-size", type=int, default=500)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="auto")
    s.add_argument("--quiet", action="store_true", help="no progress bar")


def add_evaluate_parser(sub) -> None:
    """The flags of `hybvit evaluate`."""
    e = sub.add_parser("evaluate", help="evaluate a trained run or existing samples: JSON, PNG plots, HTML report")
    e.add_argument("--run", help="a run directory (or an exported model folder)")
    e.add_argument("--samples", metavar="FILE.npz|DIR",
                   help="score these samples (arr_0 npz, or a folder of PNGs; from any model) instead of drawing "
                        "them; without --run: fid, is, kid, prc, small-fd, pixel-fd against --data")
    e.add_argument("--metrics", required=True,
                   help="comma-separated: accuracy, fid, is, kid, prc, small-fd, pixel-fd, bpd, ece, ood, pgd, "
                        "sample-analysis, speed; or all (everything that applies except the Inception ones: "
                        "fid, is, kid, prc)")
    e.add_argument("--data", help="data spec to evaluate on (default: the run's)")
    e.add_argument("--out", required=True, help="FILE.json; FILE.html and FILE-plots/ are written next to it")
    e.add_argument("--num-samples", type=int,
                   help="size of the report's one sample set: default 10000 (the paper's) with fid/is/kid/prc, "
                        "else 1000; with --samples the first N of the file (default all)")
    add_sampling_flags(e)
    e.add_argument("--inception-weights", metavar="PATH",
                   help="local Inception file for fid/is (weights-inception-2015-12-05-6726825d.pth)")
    e.add_argument("--fid-reference", default="train", choices=["train", "test"],
                   help="reference statistics (cached per dataset): the training set (default) or the test set")
    e.add_argument("--bpd-images", type=int, default=None,
                   help="test images for bpd (default: the whole test set, as the paper)")
    e.add_argument("--bpd-timesteps", type=int, default=0,
                   help="0: the full bound over all T steps; K: unbiased estimate from K random steps per image")
    e.add_argument("--ece-bins", default="15,20", help="bin counts for ECE (default 15,20)")
    e.add_argument("--ood", default="interp,noise",
                   help="OOD sets: interp, noise or data specs (e.g. svhn,cifar100); default interp,noise")
    e.add_argument("--ood-images", type=int, default=None,
                   help="the first N images of each set (default: whole sets, as the paper)")
    e.add_argument("--pgd-norms", default="linf,l2")
    e.add_argument("--pgd-images", type=int, default=1000, help="test images attacked (use fewer on a CPU)")
    e.add_argument("--pgd-steps", type=int, default=50)
    e.add_argument("--pgd-step-factor", type=float, default=None, metavar="F",
                   help="PGD as Madry et al.: step F * eps / steps, the last iterate counts (default: the paper's "
                        "protocol, step 20/255, robust only if correct at every iterate)")
    e.add_argument("--pgd-eps-linf", metavar="LIST", help="L-inf eps in /255, e.g. 1,2,4,8 (default: Table 12)")
    e.add_argument("--pgd-eps-l2", metavar="LIST", help="L2 eps in /255, e.g. 50,100 (default: 50..500, the "
                                                          "paper code's)")
    e.add_argument("--speed-samples", type=int, default=32, help="images timed per sampler for speed")
    e.add_argument("--no-html", action="store_true", help="skip the HTML report")
    e.add_argument("--batch-size", type=int, default=500)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--device", default="auto")
    e.add_argument("--quiet", action="store_true", help="no progress bars")


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    """The flags that choose how samples are drawn, the same for `sample` and `evaluate`."""
    g = p.add_argument_group("sampling")
    g.add_argument("--sampler", default="ddim", choices=["ancestral", "ddim", "dpm-solver++"])
    g.add_argument("--steps", type=int, default=50,
                   help="network evaluations for ddim / dpm-solver++ (ancestral always uses all T steps)")
    g.add_argument("--order", type=int, default=2, choices=[1, 2, 3], help="DPM-Solver++ order (default 2)")
    g.add_argument("--spacing", default="logsnr", choices=["logsnr", "time"],
                   help="DPM-Solver++ timesteps: even in log-SNR (default) or in time")
    g.add_argument("--eta", type=float, default=None,
                   help="DDIM stochasticity: 0 deterministic, 1 ancestral-like; default 0, and 1 with --class")
    g.add_argument("--eps-scale", type=float, default=1.0, metavar="L",
                   help="epsilon scaling: divide the predicted noise by L (e.g. 1.01; offsets the exposure bias "
                        "of few-step samplers; default 1 = off)")
    g.add_argument("--balance-classes", action="store_true",
                   help="HybViT only: the same number of samples of each class, as the model's own classifier labels "
                        "them (draws extra samples and keeps each while its class is short)")
    g.add_argument("--cfg-scale", type=float, default=1.0, metavar="W",
                   help="classifier-free guidance of a class-conditional run (model.class_cond): out_u + W (out_y - "
                        "out_u); default 1 = the conditional denoiser alone")


def check_sampling_flags(args, run_dir=None) -> None:
    """Ranges of the sampling flags, and what the run must be for them (when its directory is known; sampling
    checks class_cond again from the weights' config, which also covers --checkpoint)."""
    if args.sampler != "ancestral" and args.steps < 1:
        raise HybvitError("--steps must be >= 1")
    if args.eta is not None and args.eta < 0:
        raise HybvitError(f"--eta must be >= 0 (got {args.eta}); 0 is deterministic DDIM, 1 ancestral-like")
    if not args.eps_scale > 0:
        raise HybvitError(f"--eps-scale must be > 0 (got {args.eps_scale}); 1 is off, 1.005-1.02 the useful range")
    if args.cfg_scale < 0:
        raise HybvitError(f"--cfg-scale must be >= 0 (got {args.cfg_scale}); 1 is the conditional denoiser alone")
    if run_dir is not None and (args.cfg_scale != 1.0 or args.balance_classes):
        cfg = load_run_config(run_dir)
        if args.cfg_scale != 1.0 and not cfg.model.class_cond:
            raise HybvitError(f"--cfg-scale needs a class-conditional run (trained with --set "
                              f"model.class_cond=true); {run_dir} is not one, so leave it at 1")
        if args.balance_classes and cfg.train.mode != "hybvit":
            raise HybvitError(f"--balance-classes needs a HybViT run (its classifier labels the samples); "
                              f"this run is {cfg.train.mode}")


# ----------------------------------------------------------------------------- sample

def cmd_sample(args) -> int:
    ctx = distributed.init()                     # a process group when started by torchrun, else nothing
    if ctx.distributed:
        return _sample_distributed(args, ctx)
    out = _check_sample_args(args)
    run = load_run(args.run, args.checkpoint, device=args.device)
    if args.sampler != "ancestral" and args.steps > run.diffusion.T:
        raise HybvitError(f"--steps {args.steps} exceeds the model's T = {run.diffusion.T}")
    t0 = time.time()
    if args.label is not None:
        x = sample_class(run, args.label, args.num, scale=32.0 if args.guidance_scale is None else args.guidance_scale,
                         sampler=args.sampler, steps=args.steps, seed=args.seed, batch_size=args.batch_size,
                         order=args.order, spacing=args.spacing, through=args.guidance_through,
                         eta=1.0 if args.eta is None else args.eta, eps_scale=args.eps_scale,
                         cfg_scale=args.cfg_scale)
    else:
        x = run.sample(args.num, sampler=args.sampler, steps=args.steps, eta=args.eta or 0.0, seed=args.seed,
                       order=args.order, spacing=args.spacing, batch_size=args.batch_size, progress=not args.quiet,
                       eps_scale=args.eps_scale, balance_classes=args.balance_classes, cfg_scale=args.cfg_scale)
    dt = time.time() - t0
    _write_samples(to_uint8(x), run, args)
    print(f"{args.num} samples ({args.sampler}{'' if args.sampler == 'ancestral' else f', {args.steps} steps'}) "
          f"in {dt:.1f} s ({args.num / dt:.1f} images/s) -> {out}")
    return 0


def sample_file_labels(run, images, label: int | None) -> tuple[torch.Tensor | None, str]:
    """The labels a sample file records (arr_1) and what they are: the class asked for (--class), the classes a
    class-conditional denoiser was asked for (sample i: i mod K), or the HybViT head's predictions; none for an
    unconditional GenViT."""
    n, K = len(images), run.config.model.num_classes
    if label is not None:
        return torch.full((n,), label, dtype=torch.long), f"class {label}, as asked"
    if run.config.model.class_cond:
        return torch.arange(n) % K, "the classes the denoiser was asked for (sample i: i mod K)"
    if run.config.train.mode == "hybvit":
        return run.classify(images).argmax(1), "the HybViT head's predictions"
    return None, ""


def _write_samples(images: torch.Tensor, run, args) -> None:
    """To args.out: a grid (.png), an npz with labels, or a folder of PNGs (args.out ends in / or is a folder)."""
    folder = is_folder(args.out)
    if not folder and args.out.endswith(".png"):
        save_png(Path(args.out), make_grid(to_float(images)))
        return
    labels, what = (None, "") if folder else sample_file_labels(run, images, args.label)
    write_samples(args.out, images, labels)
    if labels is not None:
        print(f"labels (arr_1): {what}")


def check_out(path: str, suffixes: tuple[str, ...], what: str) -> Path:
    """An output file hybvit may write: the right suffix, not a folder, in an existing folder it can write to."""
    out = Path(path)
    if out.suffix not in suffixes:
        raise HybvitError(f"--out '{out}' must end in {' or '.join(suffixes)} ({what})")
    if out.is_dir():
        raise HybvitError(f"--out '{out}' is a folder; give a file name ending in {' or '.join(suffixes)}")
    if not out.parent.is_dir():
        raise HybvitError(f"folder '{out.parent}' does not exist; create it first")
    if not os.access(out.parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise HybvitError(f"cannot write '{out}' (permission denied); choose another --out")
    ckpt.check_can_create(out)
    return out


def check_common_flags(args) -> None:
    """--batch-size, --seed and --device of sample and evaluate."""
    if args.batch_size < 1:
        raise HybvitError(f"--batch-size must be >= 1 (got {args.batch_size})")
    if args.seed < 0:
        raise HybvitError(f"--seed must be >= 0 (got {args.seed})")
    check_device(args.device, "--device")


def check_out_folder(path: str) -> Path:
    """An output folder for PNGs: new or empty, in an existing folder hybvit can write to."""
    out = Path(path.rstrip("/" + os.sep) or "/")
    if out.exists() and not out.is_dir():
        raise HybvitError(f"--out '{path}' is a file; give a folder (ending in /) for PNGs")
    if out.is_dir() and any(out.iterdir()):
        raise HybvitError(f"--out folder '{out}' is not empty; give a new or empty folder for the PNGs")
    if not out.parent.is_dir():
        raise HybvitError(f"folder '{out.parent}' does not exist; create it first")
    if not os.access(out.parent, os.W_OK):
        raise HybvitError(f"cannot write in '{out.parent}' (permission denied); choose another --out")
    ckpt.check_can_create(out)
    return Path(path)


def _check_sample_args(args) -> Path:
    check_sampling_flags(args, args.run)
    check_common_flags(args)
    out = (check_out_folder(args.out) if is_folder(args.out) else
           check_out(args.out, (".png", ".npz"), "a grid, uint8 images, or DIR/ for PNGs"))
    if args.num < 1:
        raise HybvitError("--num must be >= 1")
    if args.guidance_scale is not None and args.guidance_scale < 0:
        raise HybvitError(f"--guidance-scale must be >= 0 (got {args.guidance_scale}); 0 is unguided")
    if args.balance_classes and args.label is not None:
        raise HybvitError("--balance-classes and --class exclude each other: --class already fixes every sample's class")
    if args.guidance_scale is not None and args.label is None:
        raise HybvitError("--guidance-scale needs --class K (the class to steer toward)")
    return out


def _sample_distributed(args, ctx) -> int:
    """`hybvit sample` under torchrun: rank 0 reads the weights and hands them over; rank r draws the batches
    k = r, r + K, ... (batch k seeded with seed + k, as one process does); rank 0 gathers them in order and writes
    the file, which therefore holds exactly the images one process would draw."""
    if args.label is not None or args.balance_classes:
        raise HybvitError("--class and --balance-classes run in one process; start `hybvit sample` without torchrun")
    out = Path(args.out)

    def load():                                  # rank 0 checks the arguments and reads the weights
        _check_sample_args(args)
        resolve_device(args.device)
        run = load_run(args.run, args.checkpoint, device="cpu")
        if args.sampler != "ancestral" and args.steps > run.diffusion.T:
            raise HybvitError(f"--steps {args.steps} exceeds the model's T = {run.diffusion.T}")
        return run
    run = distributed.all_ok(ctx, load, only_main=True)
    weights, cfg_dict = distributed.broadcast(ctx, (ckpt.plain_state_dict(run.model), run.config.to_dict())
                                              if ctx.main else None)
    run = distributed.all_ok(ctx, lambda: run_from_weights(
        weights, cfg_dict, str(distributed.device_for(resolve_device(args.device), ctx))))
    t0 = time.time()
    x = draw_samples(run.model, run.diffusion, args.num, sampler=args.sampler, steps=args.steps, eta=args.eta or 0.0,
                     seed=args.seed, device=run.device, amp=run.config.train.amp, batch_size=args.batch_size,
                     progress=ctx.main and not args.quiet, order=args.order, spacing=args.spacing, shard=(ctx.rank, ctx.world),
                     eps_scale=args.eps_scale, cfg_scale=args.cfg_scale)
    images = gather_samples(ctx, x, args.num, args.batch_size)

    def write():
        _write_samples(images, run, args)
        dt = time.time() - t0
        print(f"{args.num} samples ({args.sampler}{'' if args.sampler == 'ancestral' else f', {args.steps} steps'}) "
              f"on {ctx.world} processes in {dt:.1f} s ({args.num / dt:.1f} images/s) -> {out}")
    distributed.all_ok(ctx, write, only_main=True)
    distributed.shutdown()
    return 0

# ----------------------------------------------------------------------------- evaluate

def cmd_evaluate(args) -> int:
    out = check_out(args.out, (".json",), "the report; FILE.html and FILE-plots/ go beside it")
    check_common_flags(args)
    parse_metrics(args.metrics)                           # the names, before the run is read
    for name in ("num_samples", "bpd_images", "ood_images", "pgd_images", "pgd_steps", "speed_samples", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise HybvitError(f"--{name.replace('_', '-')} must be >= 1 (got {value})")
    if args.bpd_timesteps < 0:
        raise HybvitError("--bpd-timesteps must be >= 0 (0 = the full bound)")
    if args.run is None and args.samples is None:
        raise HybvitError("give --run DIR, --samples FILE.npz|DIR, or both")
    if args.samples is not None and not Path(args.samples).exists():
        raise HybvitError(f"--samples '{args.samples}' does not exist; give FILE.npz or a folder of PNGs")
    check_sampling_flags(args, args.run)
    try:
        bins = [int(b) for b in args.ece_bins.split(",") if b.strip()]
    except ValueError:
        raise HybvitError(f"--ece-bins '{args.ece_bins}' must be comma-separated integers, e.g. 15,20") from None
    if not bins or min(bins) < 1:
        raise HybvitError("--ece-bins needs at least one bin count >= 1")
    norms = [n.strip() for n in args.pgd_norms.split(",") if n.strip()]
    if not norms or set(norms) - {"linf", "l2"}:
        raise HybvitError(f"--pgd-norms '{args.pgd_norms}': use linf, l2 or linf,l2")
    if args.pgd_step_factor is not None and args.pgd_step_factor <= 0:
        raise HybvitError("--pgd-step-factor must be > 0")
    pgd_eps = None
    if args.pgd_eps_linf or args.pgd_eps_l2:
        pgd_eps = {}
        for norm, text in (("linf", args.pgd_eps_linf), ("l2", args.pgd_eps_l2)):
            try:
                pgd_eps[norm] = [float(v) for v in text.split(",") if v.strip()] if text else list(PAPER_EPS[norm])
            except ValueError:
                raise HybvitError(f"--pgd-eps-{norm} '{text}' must be comma-separated numbers (units of 1/255)") from None
            if not pgd_eps[norm] or min(pgd_eps[norm]) <= 0:
                raise HybvitError(f"--pgd-eps-{norm} needs positive values (units of 1/255)")
    mode = load_run_config(args.run).train.mode if args.run is not None else None
    metrics = parse_metrics(args.metrics, mode, samples_only=args.run is None)
    ctx = distributed.init()                     # under torchrun: the batch loops split over the processes
    device = args.device if not ctx.distributed else str(distributed.all_ok(
        ctx, lambda: distributed.device_for(resolve_device(args.device), ctx)))
    opts = EvalOptions(data_spec=args.data, num_samples=args.num_samples, sampler=args.sampler, steps=args.steps,
                       eta=args.eta or 0.0, order=args.order, spacing=args.spacing, eps_scale=args.eps_scale,
                       balance_classes=args.balance_classes, cfg_scale=args.cfg_scale,
                       seed=args.seed, batch_size=args.batch_size, device=device,
                       inception_weights=args.inception_weights, fid_reference=args.fid_reference,
                       bpd_images=args.bpd_images, bpd_timesteps=args.bpd_timesteps, ece_bins=bins,
                       ood=[o.strip() for o in args.ood.split(",") if o.strip()], ood_images=args.ood_images,
                       pgd_norms=norms, pgd_images=args.pgd_images, pgd_steps=args.pgd_steps,
                       pgd_step_factor=args.pgd_step_factor, pgd_eps=pgd_eps,
                       speed_samples=args.speed_samples, html=not args.no_html,
                       progress=not args.quiet and ctx.main)
    with distributed.shared_work(ctx):           # every rank computes the report; rank 0 alone writes it
        # A rank that fails anywhere (its data, a plot, the report's files) stops every rank with one line each:
        # its error meets the others at their next agreement (distributed.all_ok).
        report = distributed.all_ok(ctx, lambda: evaluate_run(
            Path(args.run) if args.run is not None else None, metrics, out=out if ctx.main else None, opts=opts,
            samples=Path(args.samples) if args.samples is not None else None))
    if ctx.main:
        for line in summary_lines(report):
            print(line)
        print(f"report -> {out}" + ("" if args.no_html else f", {out.with_suffix('.html')}")
              + (f" ({ctx.world} processes)" if ctx.distributed else ""))
    distributed.shutdown()
    return 0
