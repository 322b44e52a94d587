"""The `hybvit` command: train, sample, evaluate, presets. Bad input exits with status 2 and one line.
This module builds the parser and dispatches, and runs train, prepare, import, export and presets; sample and
evaluate live in cli_sample.py."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

from . import distributed
from . import init_from
from .cli_sample import add_evaluate_parser, add_sample_parser, cmd_evaluate, cmd_sample
from .config import MAX_SIDE, OVERLAYS, PRESETS, parse_every, preset_config, preset_description, preset_paper_params
from .datasets import prepare
from .errors import HybvitError
from .export import export_run
from .official import import_official
from .model import OFFICIAL_CIFAR10_PARAMS, ViT
from .precision import resolve_amp, resolve_device
from .prepared import check_new_folder
from .resolve import resolve_distributed, resolve_train_config
from .provenance import record_command
from .budget import every_steps
from .train import train


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
    sub = p.add_subparsers(dest="command", metavar="{train,sample,evaluate,prepare,import,export,presets}",
                           parser_class=_Parser)

    t = sub.add_parser("train", help="train a model (default: HybViT on the bundled digits, on the CPU)")
    t.add_argument("--preset", help="a preset name (see `hybvit presets`); default digits-hybvit")
    t.add_argument("--data", help="digits | npz:PATH | folder:PATH | prepared:DIR | cifar10[:ROOT]; default: the "
                                  "preset's")
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

    add_sample_parser(sub)
    add_evaluate_parser(sub)

    pp = sub.add_parser("prepare", help="decode a dataset once into memory-mappable arrays; train and evaluate on "
                                        "it with --data prepared:DIR (the processes of a node share one copy)")
    pp.add_argument("spec", metavar="SPEC", help="any --data spec: digits | npz:PATH | folder:PATH | "
                                                 "cifar10[:ROOT] ...")
    pp.add_argument("--out", required=True, help="the folder to create (new or empty)")
    pp.add_argument("--image-size", type=int, default=0, metavar="N",
                    help="resize the images to N x N (default: as stored; a prepared folder has one fixed size)")

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
        if args.command == "prepare":
            return cmd_prepare(args)
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


def cmd_prepare(args) -> int:
    if not 0 <= args.image_size <= MAX_SIDE:
        raise HybvitError(f"--image-size must lie in [1, {MAX_SIDE}] (0: as stored); got {args.image_size}")
    check_new_folder(args.out)                            # before the decoding, which may take a while
    meta = prepare(args.spec, args.out, args.image_size)
    c, h, w = meta["shape"]
    print(f"prepared {meta['name']}: {meta['train']} train / {meta['test']} test images, {h}x{w}x{c}, "
          f"{meta['num_classes']} classes -> {args.out} (x_train.npy, y_train.npy, x_test.npy, y_test.npy, "
          f"prepared.json; sha256 {meta['digest'][:16]}...); train or evaluate on it with --data prepared:{args.out}")
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
              (f", {out}/samples.png" if cfg.train.mode != "vit" else ""))
    distributed.shutdown()
    return 0


# ----------------------------------------------------------------------------- presets

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
