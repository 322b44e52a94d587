"""The `hybvit` command: train, sample, evaluate, presets. Bad input exits with status 2 and one line."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from . import checkpoint as ckpt
from . import distributed
from . import init_from
from .config import (OVERLAYS, PRESETS, check_device, parse_every, preset_config, preset_description,
                     preset_paper_params)
from .data import to_float, to_uint8
from .errors import HybvitError
from .evaluate import EvalOptions, evaluate_run, parse_metrics
from .evaluate.report import summary_lines
from .evaluate.robustness import PAPER_EPS
from .export import export_run
from .official import import_official
from .guidance import sample_class
from .model import OFFICIAL_CIFAR10_PARAMS, ViT
from .precision import resolve_amp, resolve_device
from .sample import (draw_samples, gather_samples, load_run, load_run_config, make_grid, run_from_weights, save_png)
from .samplefiles import is_folder, write_samples
from .resolve import resolve_distributed, resolve_train_config
from .provenance import record_command
from .train import every_steps, train


# Exit statuses: 0 done, 2 bad input (one line on stderr), 75 stopped by SIGTERM or Ctrl-C after writing a
# checkpoint (continue with --resume; 75 is EX_TEMPFAIL, "try again later"), 130 aborted by a second Ctrl-C.
EXIT_STOPPED = 75


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as hybvit's: one line on stderr naming the problem and the help, exit status 2."""

    def error(self, message: str):
        print(f"hybvit: error: {message}; see `{self.prog} --help`", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="hybvit", description="ViT / GenViT / HybViT: one ViT that classifies "
                                "and generates (Yang et al., 2022).")
    sub = p.add_subparsers(dest="command", metavar="{train,sample,evaluate,import,export,presets}", parser_class=_Parser)

    t = sub.add_parser("train", help="train a model (default: HybViT on the bundled digits, on the CPU)")
    t.add_argument("--preset", help="a preset name (see `hybvit presets`); default digits-hybvit")
    t.add_argument("--data", help="digits | npz:PATH | folder:PATH | cifar10[:ROOT]; default: the preset's")
    t.add_argument("--mode", help="vit | genvit | hybvit; default: the preset's")
    t.add_argument("--out", help="run directory to create; default runs/<preset>-<date>-<time>")
    budget = t.add_mutually_exclusive_group()
    budget.add_argument("--epochs", type=float, help="train for N epochs (epoch = data.epoch_repeats x the data)")
    budget.add_argument("--steps", type=int, help="train for N optimiser steps")
    budget.add_argument("--minutes", type=float, help="train for M minutes of wall-clock time")
    t.add_argument("--seed", type=int, help="random seed (default 0)")
    t.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    t.add_argument("--init-from", metavar="RUN|MODEL_DIR|CKPT",
                   help="start a new run from these weights (a hybvit run or exported model folder, a .safetensors "
                        "or last.pt file, or a checkpoint of the paper's code); the model is the source's, the "
                        "class count follows the data")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set model.dim=256 --set lr=5e-4 (repeatable)")
    t.add_argument("--stop-after", metavar="N|Nep",
                   help="stop after step N (or epoch N: Nep) of the run's full schedule, with a checkpoint; "
                        "continue later with --resume")
    t.add_argument("--quiet", action="store_true", help="no progress bar")

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

    add_evaluate_parser(sub)

    im = sub.add_parser("import", help="make a run folder from a checkpoint of the paper's code "
                                       "(checkpoint.pth or ema_checkpoint.pth of github sndnyang/Diffusion_ViT)")
    im.add_argument("checkpoint", metavar="CKPT", help="the official checkpoint file")
    im.add_argument("--out", required=True, help="the run folder to create (new or empty)")
    im.add_argument("--preset", help="check the tensors against this preset's model and take its settings "
                                     "(default: the model inferred from the tensor shapes)")

    x = sub.add_parser("export", help="write a run's EMA weights as a model folder to share (config.json, "
                                      "model.safetensors, README.md model card)")
    x.add_argument("--run", required=True, help="a run directory")
    x.add_argument("--out", required=True, help="the model folder to create (new or empty)")

    pr = sub.add_parser("presets", help="list the presets and their values")
    pr.add_argument("name", nargs="?", help="show one preset's full configuration")
    return p


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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["train"] + argv  # `hybvit` and `hybvit --steps 10 ...` mean `hybvit train ...`
    record_command(argv)                                   # provenance: the command line as typed
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:                               # --help (0) or a bad flag (2, one line already printed)
        return int(e.code or 0)
    try:
        for name, value in vars(args).items():            # every number a flag takes must be a number
            if isinstance(value, float) and not math.isfinite(value):
                raise HybvitError(f"--{name.replace('_', '-')} must be a finite number (got {value})")
        if args.command == "train":
            return cmd_train(args)
        if args.command == "sample":
            return cmd_sample(args)
        if args.command == "evaluate":
            return cmd_evaluate(args)
        if args.command == "import":
            return cmd_import(args)
        if args.command == "export":
            out = export_run(args.run, args.out)
            print(f"model folder -> {out} (config.json, model.safetensors, README.md)")
            return 0
        if args.command == "presets":
            return cmd_presets(args)
    except HybvitError as err:
        _report(err)
        return 2
    except KeyboardInterrupt:
        print("hybvit: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        return 0
    return 0


def cmd_import(args) -> int:
    if args.preset and args.preset not in PRESETS:
        raise HybvitError(f"unknown preset '{args.preset}'; run `hybvit presets` to list them")
    out, cfg = import_official(args.checkpoint, args.out, args.preset)
    for note in cfg.notes:
        print(f"import: {note}")
    m = cfg.model
    print(f"run folder -> {out} ({cfg.train.mode}, {m.image_size}x{m.image_size}x{m.channels}, patch "
          f"{m.patch_size}, {m.num_classes} classes, D {m.dim}, depth {m.depth}, {m.heads} heads); use it with "
          f"hybvit sample / evaluate / export --run {out}, or hybvit train --init-from {out}")
    return 0


def _report(err: HybvitError) -> None:
    """One line on stderr. Under torchrun rank 0 reports; another rank reports only an error of its own (tagged
    with its rank), not one that all ranks stopped on together (distributed.CollectiveError)."""
    rank = int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0
    if rank == 0:
        print(f"hybvit: error: {err}", file=sys.stderr)
        return
    if not isinstance(err, distributed.CollectiveError):
        print(f"hybvit: error (rank {rank}): {err}", file=sys.stderr)


# ----------------------------------------------------------------------------- train

def cmd_train(args) -> int:
    if args.stop_after is not None and parse_every(args.stop_after, "--stop-after") is None:
        raise HybvitError("--stop-after must be N (steps) or Nep (epochs) with N >= 1")
    ctx = distributed.init()                     # a process group when started by torchrun, else nothing
    cfg, data, out, resume = resolve_train_config(args) if not ctx.distributed else resolve_distributed(args, ctx)
    stop_after = (every_steps(args.stop_after, cfg, len(data.x_train), "--stop-after")
                  if args.stop_after is not None else None)
    if ctx.main:
        print(data.describe())
        with torch.device("meta"):
            params = ViT(cfg.model).num_params()
        budget = (f"{cfg.train.steps} steps" if cfg.train.steps else f"{cfg.train.epochs:g} epochs"
                  if cfg.train.epochs else f"{cfg.train.minutes:g} minutes")
        device = distributed.device_for(resolve_device(cfg.train.device), ctx)
        split = ""
        if ctx.distributed or cfg.train.grad_accum > 1:
            per = cfg.train.batch_size // (ctx.world * cfg.train.grad_accum)
            split = (f", global batch {cfg.train.batch_size} = {ctx.world} process(es) x {cfg.train.grad_accum} "
                     f"micro-batch(es) x {per}")
        where = f"{ctx.world} processes ({device.type})" if ctx.distributed else f"device {device}"
        amp = resolve_amp(cfg.train.amp, device)
        where += f", {amp} autocast" + (" + gradient scaler" if amp == "fp16" else "") if amp != "fp32" else ", fp32"
        print(f"{'resuming' if resume else 'training'} {cfg.train.mode} ({cfg.preset}): {params:,} parameters, "
              f"D {cfg.model.dim}, depth {cfg.model.depth}, patch {cfg.model.patch_size}, {budget}{split}, "
              f"{where}, run dir {out}")
    init = (init_from.start_weights(cfg, init_from.read_source(args.init_from))
            if args.init_from and ctx.main else None)             # the other ranks get rank 0's through DDP
    metrics = train(cfg, data, out, resume=resume, stop_after=stop_after, progress=not args.quiet, init=init)
    if metrics.get("interrupted"):
        distributed.shutdown()
        return 0 if metrics.get("stopped_after") else EXIT_STOPPED
    if ctx.main:
        print(f"done in {metrics['wall_seconds']:.0f} s: {out}/metrics.json" +
              (f", {out}/samples.png" if cfg.train.mode != "vit" and cfg.train.num_samples else ""))
    distributed.shutdown()
    return 0


# ----------------------------------------------------------------------------- sample / evaluate / presets

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
    opts = EvalOptions(data_spec=args.data, num_samples=args.num_samples, sampler=args.sampler, steps=args.steps,
                       eta=args.eta or 0.0, order=args.order, spacing=args.spacing, eps_scale=args.eps_scale,
                       balance_classes=args.balance_classes, cfg_scale=args.cfg_scale,
                       seed=args.seed, batch_size=args.batch_size, device=args.device,
                       inception_weights=args.inception_weights, fid_reference=args.fid_reference,
                       bpd_images=args.bpd_images, bpd_timesteps=args.bpd_timesteps, ece_bins=bins,
                       ood=[o.strip() for o in args.ood.split(",") if o.strip()], ood_images=args.ood_images,
                       pgd_norms=norms, pgd_images=args.pgd_images, pgd_steps=args.pgd_steps,
                       pgd_step_factor=args.pgd_step_factor, pgd_eps=pgd_eps,
                       speed_samples=args.speed_samples, html=not args.no_html, progress=not args.quiet)
    report = evaluate_run(Path(args.run) if args.run is not None else None, metrics, out=out, opts=opts,
                          samples=Path(args.samples) if args.samples is not None else None)
    for line in summary_lines(report):
        print(line)
    print(f"report -> {out}" + ("" if args.no_html else f", {out.with_suffix('.html')}"))
    return 0


def cmd_presets(args) -> int:
    if args.name:
        cfg = preset_config(args.name)
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    rows = []
    for name in PRESETS:
        cfg = preset_config(name)
        with torch.device("meta"):
            params = ViT(cfg.model).num_params()
        m, t = cfg.model, cfg.train
        budget = f"{t.steps} steps" if t.steps else f"{t.epochs:g} epochs" if t.epochs else f"{t.minutes:g} min"
        rows.append((name, t.mode, cfg.data.spec, f"{m.image_size}x{m.image_size}x{m.channels}", str(m.patch_size),
                     str(m.dim), str(m.depth), str(m.heads), f"{params:,}", preset_paper_params(name) or "-", budget,
                     preset_description(name)))
    head = ("preset", "mode", "data", "image", "patch", "dim", "depth", "heads", "params", "paper", "budget",
            "description")
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head) - 1)]
    for r in [head] + rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
    ours = next(int(r[8].replace(",", "")) for r in rows if r[0] == "cifar10-hybvit")
    verdict = "the same count" if ours == OFFICIAL_CIFAR10_PARAMS else f"{ours - OFFICIAL_CIFAR10_PARAMS:+,} here"
    print(f"\nThe paper code's model at its CIFAR-10 config has {OFFICIAL_CIFAR10_PARAMS:,} parameters; "
          f"cifar10-hybvit: {ours:,} ({verdict}).")
    for name, overlay in OVERLAYS.items():
        print(f"+{name}: {overlay.get('description', '')}")
    print("`hybvit presets NAME` prints every value of one preset (NAME+OVERLAY with an overlay); override any with "
          "--set section.key=value.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
