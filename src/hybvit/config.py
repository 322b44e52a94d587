"""Configuration: four dataclasses (model, diffusion, data, train) and the presets that fill them.

Presets live in ``presets.json`` next to this file (data, not code). A preset may name a ``base`` preset and
override any field. ``--set section.key=value`` (or a bare ``key=value`` when the key is unique) overrides a
field from the command line; values are parsed with the field's type.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from typing import Any

from .errors import HybvitError

POLICIES = ("none", "cifar10", "imagenet", "svhn", "rand")    # data.autoaugment
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
MODES = ("vit", "genvit", "hybvit")

# ----------------------------------------------------------------------------- what each field may hold
# One table for every field: ("int", lo, hi) and ("float", lo, hi) are closed ranges (None = unbounded; every float
# must be finite), ("prob", closed_at_1) a probability, ("choice", values) a name, ("device",) a device; bools and
# free strings (data.spec, checked when the data loads) need no rule. Sizes that allocate memory have upper bounds
# far above any real use, so a typo cannot ask for terabytes; the model's total size is checked again, against
# this machine's memory, before it is built (resolve.check_fits_memory).
# Options measured and not adopted, removed after commit 5a68881, with the value that meant "off": a config that
# holds them at that value (a run written before) loads; another value is refused with a one-line error.
REMOVED = {"model.final_norm": False, "model.conv_out": False, "model.self_cond": False, "train.self_cond_prob": 0.5,
           "diffusion.t_sampling": "uniform", "diffusion.t_logit_mean": 0.0, "diffusion.t_logit_std": 1.0,
           "diffusion.schedule_shift": 1.0, "diffusion.input_perturbation": 0.0, "train.adam_beta2": 0.999,
           "train.lr_schedule": "cosine", "train.diffusion_batch_size": 0, "train.eps_scale": 1.0,
           "data.diffusion_hflip": False, "data.repeated_aug": 1}
# Saved configs carry this number. Format 2: the sinusoidal time embedding divides by half - 1 as the paper's code
# does; the weights of format-1 runs (hybvit up to commit dd191b8) compute other outputs with it and are refused.
CONFIG_FORMAT = 2
LAST_FORMAT_1_COMMIT = "dd191b8"
MAX_SIDE = 4096                      # image side in pixels
RULES: dict[str, tuple] = {
    "model.image_size": ("int", 1, MAX_SIDE), "model.channels": ("int", 1, 4), "model.patch_size": ("int", 1, MAX_SIDE),
    "model.num_classes": ("int", 1, 100_000), "model.dim": ("int", 1, 16_384), "model.depth": ("int", 1, 512),
    "model.heads": ("int", 1, 1024), "model.conv_stem": ("int", 0, 1024), "model.mlp_ratio": ("float", 1e-3, 64), "model.time_hidden": ("int", 0, 65_536),
    "model.time_cond": ("choice", ("token-scalar", "adaln", "none")), "model.dropout": ("prob", False),
    "diffusion.timesteps": ("int", 2, 100_000), "diffusion.schedule": ("choice", ("cosine", "linear")),
    "diffusion.loss": ("choice", ("l1", "l2")), "diffusion.prediction": ("choice", ("eps", "v")),
    "diffusion.weighting": ("choice", ("none", "min-snr")), "diffusion.min_snr_gamma": ("float", 1e-6, None),
    "data.crop_padding": ("int", 0, MAX_SIDE), "data.autoaugment": ("choice", POLICIES),
    "data.random_erasing": ("prob", True), "data.augment_backend": ("choice", ("batched", "torchvision")),
    "data.mix_prob": ("prob", True), "data.mix_alpha": ("float", 1e-6, None), "data.diffusion_augment": ("prob", True),
    "data.epoch_repeats": ("int", 1, 10_000), "data.device_cache_gb": ("float", 0, None),
    "data.image_size": ("int", 0, MAX_SIDE),
    "train.mode": ("choice", MODES), "train.alpha": ("float", 0, None), "train.batch_size": ("int", 1, 1 << 20),
    "train.label_dropout": ("prob", True), "train.optimizer": ("choice", ("adamw", "sgd", "muon")),
    "train.lr": ("float", 1e-12, None), "train.weight_decay": ("float", 0, None), "train.momentum": ("prob", False),
    "train.warmup_epochs": ("float", 0, None), "train.warmup_max_frac": ("prob", True),
    "train.min_lr": ("float", 0, None), "train.grad_clip": ("float", 0, None), "train.ema_decay": ("prob", True),
    "train.label_smoothing": ("prob", False), "train.recipe_min_epochs": ("float", 0, None), "train.epochs": ("float", 0, None), "train.steps": ("int", 0, None),
    "train.minutes": ("float", 0, None), "train.seed": ("int", 0, 2 ** 63 - 1),
    "train.amp": ("choice", ("auto", "bf16", "fp16", "fp32")), "train.device": ("device",), "train.log_every": ("int", 1, None),
    "train.ckpt_every": ("int", 1, None), "train.sample_every": ("int", 0, None),
    "train.num_samples": ("int", 0, 1_000_000), "train.sampler": ("choice", ("ancestral", "ddim", "dpm-solver++")),
    "train.sample_steps": ("int", 1, 100_000), "train.fd_samples": ("int", 0, 1_000_000),
    "train.eval_batch_size": ("int", 1, 1 << 20), "train.compile_mode": ("choice", COMPILE_MODES),
    "train.grad_accum": ("int", 1, 1 << 20), "train.eval_every": ("every",), "train.keep_every": ("every",),
    "train.eval_samples": ("int", 0, 1_000_000), "train.threads": ("int", 0, 4096),
}


def check_device(name: str, what: str = "train.device") -> None:
    """auto, cpu, mps, cuda or cuda:N; whether the machine has it is checked when the device is resolved."""
    if name in ("auto", "cpu", "cuda", "mps") or re.fullmatch(r"cuda:\d+", name):
        return
    raise HybvitError(f"unknown device '{name}' for {what}; use auto, cpu, cuda, cuda:N or mps")


def parse_every(text: str, what: str) -> tuple[int, str] | None:
    """A period or a point in a run: "N" steps or "Nep" epochs -> (N, "steps" | "epochs"); "" or "0" -> None."""
    text = str(text).strip()
    if text in ("", "0"):
        return None
    number, unit = (text[:-2], "epochs") if text.endswith("ep") else (text, "steps")
    if not number.isdigit() or int(number) < 1:
        raise HybvitError(f"{what} '{text}' must be N (steps) or Nep (epochs) with N >= 1, e.g. 250 or 5ep")
    return int(number), unit


def check_value(key: str, value: Any, default: Any = None) -> None:
    """Raise a one-line HybvitError when `value` breaks the rule of config key `key` ('section.name')."""
    rule = RULES.get(key)
    hint = f"; e.g. --set {key}={default}" if default is not None else ""
    if isinstance(value, float) and not math.isfinite(value):
        raise HybvitError(f"{key} must be a finite number (got {value}){hint}")
    if rule is None:
        return
    kind = rule[0]
    if kind == "choice" and value not in rule[1]:
        raise HybvitError(f"unknown {key} '{value}'; use one of {', '.join(rule[1])}")
    if kind == "device":
        check_device(value, key)
    if kind == "every":
        parse_every(value, key)
    if kind == "prob" and not (0 <= value <= 1 if rule[1] else 0 <= value < 1):
        raise HybvitError(f"{key} is a probability in [0, {'1]' if rule[1] else '1)'} (got {value}){hint}")
    if kind in ("int", "float"):
        lo, hi = rule[1], rule[2]
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            bounds = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
            raise HybvitError(f"{key} must be {bounds} (got {value}){hint}")


def check_ranges(section: str, obj: Any) -> None:
    """Every field of one config section against RULES (defaults are the fix suggested)."""
    defaults = type(obj)()
    for f in fields(obj):
        check_value(f"{section}.{f.name}", getattr(obj, f.name), getattr(defaults, f.name))



@dataclass
class ModelConfig:
    image_size: int = 32
    channels: int = 3
    patch_size: int = 4
    num_classes: int = 10
    dim: int = 384
    depth: int = 9
    heads: int = 12
    mlp_ratio: float = 2.0
    # Hidden width of the time MLP; 0 means 4 * (N + 1), the width the paper's code used (260 at 32x32/patch 4).
    time_hidden: int = 0
    # Beyond the paper (the paper presets keep the defaults, which are the faithful model; docs/architecture.md):
    time_cond: str = "token-scalar"   # token-scalar (Eq. 21: a scalar per token) | adaln (per-channel adaptive
                                      # LayerNorm, zero-initialised, as DiT's adaLN-Zero) | none
    time_token: bool = False          # the time embedding as an extra input token (as U-ViT)
    long_skips: bool = False          # U-ViT long skips: block i's output feeds block depth-1-i (concat + Linear)
    zero_init_out: bool = False       # zero-initialised output layer (the denoiser starts by predicting 0)
    dropout: float = 0.0              # residual dropout on every attention and MLP output while training (0 = off,
                                      # the paper; DDPM used 0.1 for CIFAR-10's UNet)
    class_cond: bool = False          # a class-conditional denoiser: a label embedding joins the time features
                                      # (as DiT); label index num_classes means "no label" (unconditional), which
                                      # training uses for a train.label_dropout share of the diffusion images
    conv_stem: int = 0                # >0: two 3x3 convolutions (this many channels, GELU) at full resolution
                                      # before the patch embedding, a CNN's locality prior; 0 = the paper's
    augment_cond: bool = False        # the denoiser is told which geometric transform (data.diffusion_augment) each
                                      # training image got (an embedding joins the time features, as EDM's
                                      # augmentation labels); sampling asks for none, so nothing leaks

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def validate(self) -> None:
        check_ranges("model", self)
        if self.image_size % self.patch_size != 0:
            raise HybvitError(
                f"image size {self.image_size} is not divisible by patch size {self.patch_size}; "
                f"pick a divisor, e.g. --set model.patch_size={_divisor_near(self.image_size, self.patch_size)}")
        if self.dim % self.heads != 0:
            raise HybvitError(f"model.dim {self.dim} is not divisible by model.heads {self.heads}; "
                              f"choose heads that divide dim")
        if self.time_cond == "none" and not self.time_token:
            raise HybvitError("model.time_cond=none needs model.time_token=true, or the denoiser never sees t")


@dataclass
class DiffusionConfig:
    timesteps: int = 1000
    schedule: str = "cosine"          # cosine | linear
    loss: str = "l1"                  # l1 (the paper's code) | l2 (Eq. 15)
    prediction: str = "eps"           # eps (the paper) | v (v = alpha_t eps - sigma_t x0, Salimans & Ho 2022)
    weighting: str = "none"           # none (L_simple) | min-snr (min(SNR, gamma) weights, Hang et al. 2023)
    min_snr_gamma: float = 5.0

    def validate(self) -> None:
        check_ranges("diffusion", self)


@dataclass
class DataConfig:
    spec: str = "digits"
    crop_padding: int = 0             # random-crop padding for the classification batch (0 = off)
    hflip: bool = False               # random horizontal flip for the classification batch
    autoaugment: str = "none"         # classification batch: none | cifar10 | imagenet | svhn (AutoAugment) | rand
    random_erasing: float = 0.0       # probability of random erasing per image (the paper's code: 0.25)
    augment_backend: str = "batched"  # batched (grouped calls on the data's device) | torchvision (per image, CPU)
    mix_prob: float = 0.0             # probability per image of CutMix or Mixup, even odds (the paper's code: 0.5)
    mix_alpha: float = 1.0            # Beta(alpha, alpha) for the mixing ratio
    diffusion_augment: float = 0.0    # probability per diffusion image of a random dihedral turn/flip + up-to-1-pixel
                                      # shift, told to the denoiser (needs model.augment_cond; non-leaking, as EDM)
    epoch_repeats: int = 1            # an "epoch" is epoch_repeats x the training set (the paper: 3)
    device_cache_gb: float = 4.0      # keep the uint8 training set on the GPU when it is at most this size
    image_size: int = 0               # 0 = keep the data's size; >0 resizes folder images to this size

    def validate(self) -> None:
        check_ranges("data", self)


@dataclass
class TrainConfig:
    mode: str = "hybvit"
    alpha: float = 100.0              # L = L_CE + alpha * L_simple (Eq. 23)
    batch_size: int = 128             # per branch: hybvit draws two independent batches of this size
    label_dropout: float = 0.1        # model.class_cond: the share of diffusion images trained with "no label"
    optimizer: str = "adamw"          # adamw (the paper's code) | sgd (the paper's text) | muon (Muon on the
                                      # blocks' matrices + AdamW on the rest; torch >= 2.9)
    lr: float = 1e-3
    weight_decay: float = 0.05
    momentum: float = 0.9             # sgd only
    warmup_epochs: float = 10.0
    warmup_max_frac: float = 0.1      # warm-up never longer than this fraction of the run
    min_lr: float = 1e-6
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    ema_warmup: bool = False          # decay min(ema_decay, (1+s)/(10+s)): helps short runs
    label_smoothing: float = 0.0
    recipe_min_epochs: float = 0.0    # >0: keep data.crop_padding and label_smoothing only if the run sees its
                                      # data at least this many times; decided once the run's length in steps is
                                      # known, then recorded in config.json (your data with no preset: 30)
    epochs: float = 0.0               # budget: exactly one of epochs / steps / minutes is used
    steps: int = 0
    minutes: float = 0.0
    seed: int = 0
    amp: str = "auto"                 # auto (bf16 on GPUs with native bf16, fp16 + gradient scaler on older ones, bf16
                                      # on a CPU where bf16 matmuls measure >1.2x fp32) | bf16 | fp16 | fp32
    device: str = "auto"              # auto | cpu | cuda | cuda:N
    log_every: int = 10
    ckpt_every: int = 500             # steps between checkpoints (and at the end)
    sample_every: int = 0             # steps between TensorBoard sample grids (0 = only at the end)
    num_samples: int = 100            # images in samples.png
    sampler: str = "ddim"             # ancestral | ddim | dpm-solver++ (order 2, logSNR steps): samples.png, FD
    sample_steps: int = 50
    fd_samples: int = 0               # >0: at the end, pixel-space Frechet distance of this many samples
    eval_every: str = ""              # "N" steps or "Nep" epochs: test accuracy (raw, EMA) and a sample metric
                                      # while training, to TensorBoard and log.jsonl ("" = only at the end)
    eval_samples: int = 1000          # samples for that metric: small-fd, or FID with train.inception_weights
    inception_weights: str = ""       # the Inception file: eval_every measures FID instead of small-fd
    keep_every: str = ""              # "N" steps or "Nep" epochs: keep checkpoints/ema-<step>.safetensors
    eval_batch_size: int = 500
    compile: bool = False
    compile_mode: str = "default"     # torch.compile mode: default | reduce-overhead (CUDA graphs) | max-autotune
                                      # | max-autotune-no-cudagraphs
    grad_accum: int = 1               # micro-batches per step: batch_size (the global batch, over all processes)
                                      # is split into processes x grad_accum pieces; the same update as one batch
    threads: int = 0                  # CPU threads: 0 = all, dropping to one while other work slows the steps
                                      # more than 2x (threads.py); N = exactly N
    joint_pass: bool = False          # hybvit: CE and diffusion batches through one forward pass (bigger matmuls;
                                      # measured no gain on the CPU; for launch-bound GPUs)

    def validate(self) -> None:
        check_ranges("train", self)
        budgets = [b for b in (self.epochs, self.steps, self.minutes) if b]
        if len(budgets) > 1:
            raise HybvitError("give one training budget: --epochs, --steps or --minutes, not several")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    preset: str = ""
    notes: list[str] = field(default_factory=list)   # what was adapted to the data, and why (config.json)

    SECTIONS = ("model", "diffusion", "data", "train")

    def validate(self) -> None:
        self.model.validate()
        self.diffusion.validate()
        self.data.validate()
        self.train.validate()
        if self.model.class_cond and self.train.mode == "vit":
            raise HybvitError("model.class_cond conditions the denoiser, and a vit run has none; "
                              "drop it or use --set train.mode=hybvit")
        if self.model.augment_cond and self.train.mode == "vit":
            raise HybvitError("model.augment_cond conditions the denoiser, and a vit run has none; "
                              "drop it or use --set train.mode=hybvit")
        if self.data.diffusion_augment > 0 and not self.model.augment_cond and self.train.mode != "vit":
            raise HybvitError("data.diffusion_augment without model.augment_cond would leak turned and shifted "
                              "images into the samples; add --set model.augment_cond=true")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "format": CONFIG_FORMAT}

    @classmethod
    def from_saved(cls, d: dict[str, Any], where: str) -> "Config":
        """The config of a saved run or model (config.json, a checkpoint's metadata), from a version of hybvit whose
        model computes what this one does."""
        found = d.get("format", 1)
        if found != CONFIG_FORMAT:
            if isinstance(found, int) and found > CONFIG_FORMAT:
                raise HybvitError(f"{where} was written by a newer hybvit (config format {found}); upgrade hybvit")
            raise HybvitError(f"{where} was written by hybvit before config format {CONFIG_FORMAT}, whose time "
                              f"embedding differs from the paper's code, so its weights would now compute other "
                              f"outputs; train it again, or use it with hybvit {LAST_FORMAT_1_COMMIT}")
        return cls.from_dict(d)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Config":
        cfg = cls()
        for section in cls.SECTIONS:
            part = d.get(section, {})
            if not isinstance(part, dict):
                raise HybvitError(f"config section '{section}' is not a mapping; the config is damaged")
            for key, value in part.items():
                if f"{section}.{key}" in REMOVED:                # runs written before these options were removed
                    if value != REMOVED[f"{section}.{key}"]:
                        raise HybvitError(f"this run was trained with {section}.{key}={value}, an option hybvit no "
                                          f"longer has (see docs/architecture.md); load it with hybvit 5a68881")
                    continue
                _set_field(cfg, section, key, value)
        cfg.preset = d.get("preset", "")
        cfg.notes = [str(n) for n in d.get("notes", [])]
        return cfg

    def set(self, assignment: str) -> None:
        """Apply one ``key=value`` override (``section.key`` or a bare, unambiguous ``key``)."""
        if "=" not in assignment:
            raise HybvitError(f"--set expects key=value, got '{assignment}'")
        key, raw = assignment.split("=", 1)
        key = key.strip()
        if "." in key:
            section, name = key.split(".", 1)
        else:
            owners = [s for s in self.SECTIONS if name_in(getattr(self, s), key)]
            if len(owners) != 1:
                where = " or ".join(f"{s}.{key}" for s in owners) if owners else "a known key"
                raise HybvitError(f"unknown or ambiguous --set key '{key}'; use {where} "
                                  f"(see `hybvit presets` for all keys)")
            section, name = owners[0], key
        _set_field(self, section, name, raw, parse=True)


def name_in(obj: Any, key: str) -> bool:
    return key in {f.name for f in fields(obj)}


def _set_field(cfg: Config, section: str, name: str, value: Any, parse: bool = False) -> None:
    if section not in Config.SECTIONS:
        raise HybvitError(f"unknown config section '{section}'; use one of {', '.join(Config.SECTIONS)}")
    obj = getattr(cfg, section)
    types = {f.name: f.type for f in fields(obj)}
    if name not in types:
        raise HybvitError(f"unknown config key '{section}.{name}'; see `hybvit presets` for all keys")
    kind = types[name]
    try:
        if kind == "bool":
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                value = value.lower() in ("true", "1", "yes")
            value = bool(value)
        elif kind == "int":
            if isinstance(value, str):
                value = int(value) if value.strip().lstrip("+-").isdigit() else float(value)
            if isinstance(value, bool) or float(value) != int(value):
                raise ValueError(value)
            value = int(value)
        elif kind == "float":
            value = float(value)
        else:
            value = str(value)
    except (ValueError, TypeError, OverflowError):
        raise HybvitError(f"bad value '{value}' for {section}.{name}: expected {kind}") from None
    setattr(obj, name, value)


def _divisor_near(n: int, p: int) -> int:
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    return min(divisors, key=lambda d: (abs(d - p), d))


# ----------------------------------------------------------------------------- presets

def _load_presets() -> dict[str, dict[str, Any]]:
    text = resources.files("hybvit").joinpath("presets.json").read_text()
    return {k: v for k, v in json.loads(text).items() if k != "_comment"}


_ALL_PRESETS = _load_presets()               # bases (names from "_") and overlays (names from "+") included
PRESETS = {k: v for k, v in _ALL_PRESETS.items() if k[0] not in "_+"}          # what users name and list
OVERLAYS = {k[1:]: v for k, v in _ALL_PRESETS.items() if k.startswith("+")}    # NAME+OVERLAY
DEFAULT_PRESET = "digits-hybvit"
OWN_DATA_PRESET = "own-data"          # the -plus architecture sized from your data (patch, crop); named with --preset


def _resolve(name: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    if not seen and "+" in name:                                # a preset with overlays: NAME+OVERLAY[+...]
        base, *overlays = name.split("+")
        merged = _resolve(base)
        for overlay in overlays:
            if overlay not in OVERLAYS:
                raise HybvitError(f"unknown overlay '+{overlay}' in preset '{name}'; the overlays are "
                                  f"{', '.join('+' + o for o in OVERLAYS)}")
            for section in Config.SECTIONS:
                merged.setdefault(section, {}).update(OVERLAYS[overlay].get(section, {}))
        return merged
    if name not in _ALL_PRESETS or (not seen and name not in PRESETS):
        raise HybvitError(f"unknown preset '{name}'; run `hybvit presets` to list them")
    if name in seen:
        raise HybvitError(f"preset '{name}' inherits from itself")
    entry = _ALL_PRESETS[name]
    merged: dict[str, Any] = _resolve(entry["base"], seen + (name,)) if "base" in entry else {}
    for section in Config.SECTIONS:
        merged.setdefault(section, {}).update(entry.get(section, {}))
    return merged


def preset_config(name: str) -> Config:
    cfg = Config.from_dict(_resolve(name))
    cfg.preset = name
    return cfg


def preset_description(name: str) -> str:
    return PRESETS[name].get("description", "")


def preset_paper_params(name: str) -> str:
    """The parameter count the paper reports for this preset's model ("12.9M"), or "" where it gives none."""
    return str(PRESETS[name].get("paper_params", ""))


def replace(obj: Any, **changes: Any) -> Any:
    return dataclasses.replace(obj, **changes)
