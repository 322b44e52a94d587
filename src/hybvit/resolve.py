"""From the command line to a run: the preset (or the resumed run's config), flags, --set, and the model adapted
to the data, checked against the data before anything is trained or written."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from . import checkpoint as ckpt
from . import distributed
from . import init_from
from .config import DEFAULT_PRESET, OWN_DATA_PRESET, Config, check_ranges, preset_config
from .datasets import load_data
from .prepared import source_spec
from .errors import HybvitError
from .model import ViT
from .precision import resolve_amp, resolve_device
from .untrusted import physical_memory
from .data import check_batch_split


def resolve_train_config(args):
    """Preset / saved config + flags + --set + data adaptation. Returns (cfg, data, out_dir, resume)."""
    explicit_sets = {a.split("=", 1)[0].strip() for a in args.set}
    if args.resume:
        run_dir = Path(args.resume)
        saved = resumed_config(run_dir, args.preset)
        cfg = Config.from_dict(saved.to_dict())
    else:
        cfg = preset_config(args.preset or default_preset(args.data))
    source = None
    if getattr(args, "init_from", None):
        if args.resume:
            raise HybvitError("--init-from starts a new run and --resume continues one; give one of them")
        source = init_from.read_source(args.init_from)
        init_from.take_model(cfg, source)                    # before --set, which may still change it
    if args.mode:
        if args.mode not in ("vit", "genvit", "hybvit"):
            raise HybvitError(f"unknown mode '{args.mode}'; use vit, genvit or hybvit")
        cfg.train.mode = args.mode
    if args.seed is not None:
        cfg.train.seed = args.seed
    if args.epochs is not None or args.steps is not None or args.minutes is not None:
        cfg.train.epochs, cfg.train.steps, cfg.train.minutes = args.epochs or 0.0, args.steps or 0, args.minutes or 0.0
    if args.data:
        cfg.data.spec = args.data
    for assignment in args.set:
        cfg.set(assignment)
    for section in Config.SECTIONS:             # every value in range before any data is read or probe is run
        check_ranges(section, getattr(cfg, section))
    cfg.train.validate()

    data = load_data(cfg.data.spec, cfg.data.image_size)
    if args.resume:
        for section in ("model", "diffusion"):
            before, after = getattr(saved, section).__dict__, getattr(cfg, section).__dict__
            diff = [f"{section}.{k}: {before[k]} -> {after[k]}" for k in before if before[k] != after[k]]
            if diff:
                raise HybvitError(f"--resume with a different model config ({'; '.join(diff)}); "
                                  f"resume without changing it, or start a new run with --out")
        if cfg.train.mode != saved.train.mode:
            raise HybvitError(f"--resume with mode {cfg.train.mode} but the run was trained as {saved.train.mode}; "
                              f"start a new run to change the mode")
        check_data_fits(cfg, data)
        check_fits_memory(cfg)
        return cfg, data, run_dir, True

    if source is not None:                                   # an existing model: only the class count follows
        given = "model.num_classes" in explicit_sets or "num_classes" in explicit_sets
        cfg.notes = init_from.fit_source(cfg, data.num_classes, source, given)
    else:
        cfg.notes = adapt_model_to_data(cfg, data, preset_named=bool(args.preset), explicit=explicit_sets)
    for note in cfg.notes:
        print(f"{'from the source' if source is not None else 'adapted to the data'}: {note}")
    if is_own_data(cfg.data.spec):
        print(f"your data with the {cfg.preset} preset: what it gave on data nobody tuned for, at 5 and 15 "
              f"CPU-minutes, is in docs/results/own-data.md")
    warning = narrow_tokens(cfg.model)
    if warning and cfg.train.mode != "vit":
        print(f"warning: {warning}")
    cfg.validate()
    check_data_fits(cfg, data)
    check_fits_memory(cfg)
    if cfg.train.amp == "auto":                   # decided once and recorded: --resume keeps the run's precision
        cfg.train.amp = resolve_amp("auto", resolve_device(cfg.train.device))
        cfg.notes.append(f"amp auto -> {cfg.train.amp} on this machine (recorded so a resume keeps it)")
    out = Path(args.out) if args.out else Path("runs") / f"{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    if (out / "checkpoints" / "last.pt").exists():
        raise HybvitError(f"run directory '{out}' already holds a run; continue it with --resume {out} "
                          f"or choose another --out")
    if out.exists() and not out.is_dir():
        raise HybvitError(f"--out '{out}' is a file; give a directory for the run")
    ckpt.check_can_create(out)
    return cfg, data, out, False


def resumed_config(run_dir: Path, preset: str | None) -> Config:
    """The saved configuration of the run `--resume` continues, checked: it has a checkpoint and its preset."""
    cfg_path = run_dir / "config.json"
    if not cfg_path.exists():
        raise HybvitError(f"cannot resume: '{run_dir}' has no config.json; give the directory of an earlier "
                          f"`hybvit train` run")
    if not (run_dir / "checkpoints" / "last.pt").exists():
        raise HybvitError(f"cannot resume: the run in '{run_dir}' stopped before its first checkpoint; start it "
                          f"again with the same flags and --out {run_dir}")
    saved = Config.from_saved(ckpt.read_json(cfg_path, "run config"), f"run '{run_dir}'")
    if preset and preset != saved.preset:
        raise HybvitError(f"--preset {preset} differs from the resumed run's preset '{saved.preset}'; "
                          f"drop --preset when resuming")
    return saved


def default_preset(spec: str | None) -> str:
    """The preset of a run that names none: own-data for a user's dataset (npz:PATH, folder:PATH), whatever its
    size or budget (at 15 CPU-minutes it sampled better than the adapted digits preset: docs/results/own-data.md);
    the digits preset otherwise, adapted to the data."""
    return OWN_DATA_PRESET if is_own_data(spec) else DEFAULT_PRESET


def is_own_data(spec: str | None) -> bool:
    """A user's dataset (npz:PATH, folder:PATH, or a prepared folder made from one), for which no preset was
    tuned."""
    spec = source_spec(spec)
    return bool(spec) and spec.partition(":")[0] in ("npz", "folder")


def own_data_patch(image_size: int) -> int:
    """The patch size of the own-data preset: the divisor of the image size whose grid is nearest 8 x 8 tokens
    (28 -> 4, 32 -> 4, 64 -> 8, 96 -> 12), so each token is a few pixels, not a whole stroke; ties go to the
    smaller patch (more tokens)."""
    divisors = [d for d in range(1, image_size + 1) if image_size % d == 0]
    return min(divisors, key=lambda d: (abs(image_size / d - 8), d))


def narrow_tokens(m) -> str:
    """Why the denoiser cannot carry the noise when a patch has more values (P*P*C) than the token's width D: the
    patch embedding and the output layer then pass the noise through a D-dimensional bottleneck, and the part of
    it outside that subspace is never predicted (nor removed while sampling). '' when the token is wide enough."""
    values = m.patch_size ** 2 * m.channels
    if values <= m.dim:
        return ""
    return (f"a {m.patch_size}x{m.patch_size}x{m.channels} patch has {values} values, more than the token's width "
            f"{m.dim}: the denoiser cannot predict all of its noise; use a smaller model.patch_size or a larger "
            f"model.dim")


def own_data_crop(image_size: int) -> int:
    """The random-crop padding of the own-data recipes: an eighth of the image (4 pixels at 28 and 32)."""
    return max(1, round(image_size / 8))


def adapt_model_to_data(cfg, data, preset_named: bool, explicit: set[str]) -> list[str]:
    """Fit channels, classes and image size to the data. The own-data preset also takes its patch size from the
    image size (own_data_patch) and its crop padding (an eighth of the image); the digits preset, when no preset
    was named, keeps its number of tokens with patches no wider than a token. Keys given with --set are never
    changed. Returns one note per choice."""
    m, notes = cfg.model, []
    given = lambda key: key in explicit or key.split(".", 1)[1] in explicit     # noqa: E731
    if m.channels != data.channels:
        notes.append(f"channels {m.channels} -> {data.channels}")
        m.channels = data.channels
    if m.num_classes != data.num_classes and not given("model.num_classes"):
        notes.append(f"classes {m.num_classes} -> {data.num_classes}")
        m.num_classes = data.num_classes
    own = cfg.preset == OWN_DATA_PRESET
    if m.image_size != data.image_size or own:
        tokens = m.num_patches
        if m.image_size != data.image_size:
            notes.append(f"image size {m.image_size} -> {data.image_size}")
        m.image_size = data.image_size
        if own and not given("model.patch_size"):
            best = own_data_patch(data.image_size)
            notes.append(f"patch size {best}: a {data.image_size // best}x{data.image_size // best} grid of "
                         f"{best}x{best}-pixel tokens")
            m.patch_size = best
        elif not (preset_named or given("model.patch_size")):
            # the preset's number of tokens, with patches no wider than the token (narrow_tokens)
            divisors = [d for d in range(1, data.image_size + 1) if data.image_size % d == 0]
            nearest = lambda ds: min(ds, key=lambda d: (abs((data.image_size // d) ** 2 - tokens), -d))  # noqa: E731
            best = nearest([d for d in divisors if d * d * m.channels <= m.dim] or [1])
            too_wide = nearest(divisors)
            why = (f"; patch {too_wide} would give each {m.dim}-wide token {too_wide ** 2 * m.channels} values, "
                   f"more than its denoiser can carry" if too_wide != best else "")
            if best != m.patch_size or why:
                change = f"{m.patch_size} -> {best}" if best != m.patch_size else f"{best} kept"
                notes.append(f"patch size {change} ({(data.image_size // best) ** 2} tokens, the preset had "
                             f"{tokens}{why})")
                m.patch_size = best
        if own and not given("data.crop_padding"):
            cfg.data.crop_padding = own_data_crop(data.image_size)
            notes.append(f"classification batch: random crop with {cfg.data.crop_padding}-pixel padding (an eighth "
                         f"of the image), label smoothing {cfg.train.label_smoothing:g}, no flips (unknown data may "
                         f"not be mirror-symmetric; add --set data.hflip=true if it is)")
    return notes


def training_bytes(model_cfg) -> tuple[int, int]:
    """(parameters, bytes to train them): weights, gradients, two Adam moments and the EMA, 4 bytes each; counted on
    the meta device, so nothing is allocated."""
    with torch.device("meta"):
        params = ViT(model_cfg).num_params()
    return params, 5 * 4 * params


def check_fits_memory(cfg) -> None:
    """Refuse a model whose training state alone exceeds this machine's memory (or the GPU's), before building it."""
    params, need = training_bytes(cfg.model)
    device = resolve_device(cfg.train.device)
    if device.type == "cuda":
        have, where = torch.cuda.get_device_properties(device).total_memory, "the GPU's memory"
    else:
        have, where = physical_memory(), "this machine's memory"
    if have is not None and need > have:
        raise HybvitError(f"the model has {params:,} parameters: {need / 2 ** 30:.1f} GiB to train, more than "
                          f"{where} ({have / 2 ** 30:.1f} GiB); lower model.dim or model.depth")


def check_data_fits(cfg, data) -> None:
    m = cfg.model
    if data.num_classes < 2 and cfg.train.mode != "genvit":
        raise HybvitError(f"{data.name} has no class labels, so mode {cfg.train.mode} cannot train a classifier; "
                          f"use --mode genvit")
    if data.num_classes < 2 and m.class_cond:
        raise HybvitError(f"{data.name} has no class labels for model.class_cond to condition on; "
                          f"use --set model.class_cond=false")
    if (data.channels, data.image_size) != (m.channels, m.image_size):
        raise HybvitError(f"data {data.name} is {data.image_size}x{data.image_size}x{data.channels} but the model "
                          f"takes {m.image_size}x{m.image_size}x{m.channels}; use matching data")
    if data.num_classes > m.num_classes:
        raise HybvitError(f"labels go up to {data.num_classes - 1} but model.num_classes is {m.num_classes}; "
                          f"labels out of range: raise model.num_classes or relabel the data")


def resolve_distributed(args, ctx):
    """resolve_train_config under torchrun: rank 0 resolves the configuration alone (its notes and errors are printed
    once; a download happens once) and hands it to the other ranks, which then load the same data, the first
    process of each node before the others (a dataset missing on a node is downloaded there once)."""
    def resolve():
        cfg, data, out, resume = resolve_train_config(args)
        check_batch_split(cfg, len(data.x_train), ctx.world)
        return cfg, data, out, resume
    resolved = distributed.all_ok(ctx, resolve, only_main=True)
    cfg_dict, out, resume = distributed.broadcast(
        ctx, (resolved[0].to_dict(), str(resolved[2]), resolved[3]) if ctx.main else None)
    cfg = resolved[0] if ctx.main else Config.from_dict(cfg_dict)
    data = resolved[1] if ctx.main else None
    for first_on_node in (True, False):
        mine = not ctx.main and (ctx.local_rank == 0) == first_on_node
        loaded = distributed.all_ok(ctx, lambda load=mine: load_data(cfg.data.spec, cfg.data.image_size)
                                    if load else None)
        data = loaded if mine else data
    # every process needs a GPU of its own (when training on GPUs): the ones without say so, the others stop
    distributed.all_ok(ctx, lambda: distributed.device_for(resolve_device(cfg.train.device), ctx))
    return cfg, data, Path(out), resume
