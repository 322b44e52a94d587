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
# Each field carries its rule beside it: ints(lo, hi) and floats(lo, hi) are closed ranges (None = unbounded; every
# float must be finite), prob(closed_at_1) a probability, choice(...) a name, DEVICE a device, EVERY a period ("N"
# steps or "Nep" epochs); bools and free strings (data.spec, checked when the data loads) need none. Sizes that
# allocate memory have upper bounds far above any real use, so a typo cannot ask for terabytes; the model's total
# size is checked again, against this machine's memory, before it is built (resolve.check_fits_memory).
MAX_SIDE = 4096                      # image side in pixels


def ints(lo, hi):
    return ("int", lo, hi)


def floats(lo, hi):
    return ("float", lo, hi)


def prob(closed_at_1: bool):
    return ("prob", closed_at_1)


def choice(*values: str):
    return ("choice", values)


DEVICE, EVERY = ("device",), ("every",)


def ruled(default: Any, rule: tuple | None = None) -> Any:
    """A dataclass field with its rule (check_value) in the field's metadata."""
    return field(default=default, metadata={"rule": rule} if rule else {})


# Options that earlier versions had, with the value that meant what hybvit now always does. A saved run that holds
# one at that value loads (the key is ignored); another value changed what the run trained and is refused with one
# line. Options measured and not adopted are findings in docs/results; internals became rules (one sentence each,
# beside the code that applies them; docs/architecture.md lists them).
REMOVED = {"model.dropout": 0.0, "model.time_hidden": 0, "model.mlp_ratio": 2.0,
           "model.time_cond": "token-scalar", "model.time_token": False, "model.long_skips": False,
           "model.zero_init_out": False, "model.conv_stem": 0, "diffusion.min_snr_gamma": 5.0,
           "data.augment_backend": "batched", "data.mix_alpha": 1.0, "train.label_dropout": 0.1,
           "train.momentum": 0.9, "train.warmup_max_frac": 0.1, "train.min_lr": 1e-6, "train.recipe_min_epochs": 0.0}
# Removed options that set only outputs or speed (logging, previews, evaluation while training, placement,
# compilation), never what a run trains: a saved run loads whatever value it holds.
REMOVED_OUTPUTS = {"train.log_every", "train.sample_every", "train.num_samples", "train.sampler", "train.sample_steps",
                   "train.eval_samples", "train.inception_weights", "train.eval_batch_size", "train.compile_mode",
                   "train.joint_pass", "data.device_cache_gb"}
# The -plus architecture (model.plus) replaces four of them at once: a run that held all four at these values loads
# as model.plus=true.
PLUS_KEYS = {"model.time_cond": "adaln", "model.time_token": True, "model.long_skips": True,
             "model.zero_init_out": True}
# Saved configs carry this number. Format 2: the sinusoidal time embedding divides by half - 1 as the paper's code
# does; the weights of format-1 runs (hybvit up to commit dd191b8) compute other outputs with it and are refused.
CONFIG_FORMAT = 2
LAST_FORMAT_1_COMMIT = "dd191b8"


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
    image_size: int = ruled(32, ints(1, MAX_SIDE))
    channels: int = ruled(3, ints(1, 4))
    patch_size: int = ruled(4, ints(1, MAX_SIDE))
    num_classes: int = ruled(10, ints(1, 100_000))
    dim: int = ruled(384, ints(1, 16_384))
    depth: int = ruled(9, ints(1, 512))
    heads: int = ruled(12, ints(1, 1024))
    # Beyond the paper (the paper presets keep the defaults, which are the faithful model; docs/architecture.md):
    plus: bool = False                # the -plus architecture: adaLN-Zero time conditioning (per-channel, as DiT),
                                      # the time embedding as an extra token (as U-ViT), U-ViT long skips and a
                                      # zero-initialised output layer; each was measured alone in
                                      # docs/results/arch-ablation-digits.md, and together they are the -plus presets
    class_cond: bool = False          # a class-conditional denoiser: a label embedding joins the time features
                                      # (as DiT); label index num_classes means "no label" (unconditional), which
                                      # training uses for a tenth of the diffusion images (classifier-free guidance)
    augment_cond: bool = False        # the denoiser is told which geometric transform (data.diffusion_augment) each
                                      # training image got (an embedding joins the time features, as EDM's
                                      # augmentation labels); sampling asks for none, so nothing leaks

    # What model.plus switches on, as the model code reads it.
    @property
    def time_cond(self) -> str:
        return "adaln" if self.plus else "token-scalar"

    @property
    def time_token(self) -> bool:
        return self.plus

    @property
    def long_skips(self) -> bool:
        return self.plus

    @property
    def zero_init_out(self) -> bool:
        return self.plus

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


@dataclass
class DiffusionConfig:
    timesteps: int = ruled(1000, ints(2, 100_000))
    schedule: str = ruled("cosine", choice("cosine", "linear"))
    loss: str = ruled("l1", choice("l1", "l2"))           # l1 (the paper's code) | l2 (Eq. 15)
    prediction: str = ruled("eps", choice("eps", "v"))    # eps (the paper) | v (alpha_t eps - sigma_t x0, Salimans
                                                          # & Ho 2022)
    weighting: str = ruled("none", choice("none", "min-snr"))   # none (L_simple) | min-snr (weights min(SNR, 5),
                                                                # Hang et al. 2023)

    def validate(self) -> None:
        check_ranges("diffusion", self)


@dataclass
class DataConfig:
    spec: str = "digits"
    crop_padding: int = ruled(0, ints(0, MAX_SIDE))       # random-crop padding for the classification batch (0 = off)
    hflip: bool = False               # random horizontal flip for the classification batch
    autoaugment: str = ruled("none", choice(*POLICIES))   # classification batch: AutoAugment policy | rand | none
    random_erasing: float = ruled(0.0, prob(True))        # probability of random erasing per image (the paper's code:
                                                          # 0.25)
    mix_prob: float = ruled(0.0, prob(True))  # probability per batch of CutMix or Mixup, even odds, mixing ratio from
                                              # Beta(1, 1) (the paper's code: 0.5)
    diffusion_augment: float = ruled(0.0, prob(True))  # probability per diffusion image of a random dihedral turn/flip
                                      # + up-to-1-pixel shift, told to the denoiser (needs model.augment_cond; as EDM)
    epoch_repeats: int = ruled(1, ints(1, 10_000))        # an "epoch" is epoch_repeats x the training set (the
                                                          # paper: 3)
    image_size: int = ruled(0, ints(0, MAX_SIDE))         # 0 = keep the data's size; >0 resizes folder images

    def validate(self) -> None:
        check_ranges("data", self)


@dataclass
class TrainConfig:
    mode: str = ruled("hybvit", choice(*MODES))
    alpha: float = ruled(100.0, floats(0, None))          # L = L_CE + alpha * L_simple (Eq. 23)
    batch_size: int = ruled(128, ints(1, 1 << 20))        # per branch: hybvit draws two independent batches of this
                                                          # size (the global batch, over all processes)
    optimizer: str = ruled("adamw", choice("adamw", "sgd", "muon"))  # adamw (the paper's code) | sgd (the paper's
                                      # text; Nesterov momentum 0.9) | muon (the blocks' matrices; AdamW on the rest)
    lr: float = ruled(1e-3, floats(1e-12, None))
    weight_decay: float = ruled(0.05, floats(0, None))
    warmup_epochs: float = ruled(10.0, floats(0, None))   # linear warm-up (never more than a tenth of the run), then
                                                          # cosine decay to 1e-6
    grad_clip: float = ruled(1.0, floats(0, None))        # gradient-norm clip (0 = off)
    ema_decay: float = ruled(0.999, prob(True))
    ema_warmup: bool = False          # decay min(ema_decay, (1+s)/(10+s)): helps short runs
    label_smoothing: float = ruled(0.0, prob(False))
    epochs: float = ruled(0.0, floats(0, None))           # budget: exactly one of epochs / steps / minutes is used
    steps: int = ruled(0, ints(0, None))
    minutes: float = ruled(0.0, floats(0, None))
    seed: int = ruled(0, ints(0, 2 ** 63 - 1))
    amp: str = ruled("auto", choice("auto", "bf16", "fp16", "fp32"))  # auto: bf16 on GPUs with native bf16, fp16
                                      # + gradient scaler on older ones, bf16 on a CPU where bf16 matmuls measure
                                      # >1.2x fp32 (precision.py); decided once and recorded
    device: str = ruled("auto", DEVICE)                   # auto | cpu | cuda | cuda:N | mps
    ckpt_every: int = ruled(500, ints(1, None))           # steps between checkpoints (and at the end)
    fd_samples: int = ruled(0, ints(0, 1_000_000))  # >0: at the end, pixel-space Frechet distance of this many
                                                    # DDIM-50 samples (samples.png shows 100 of them)
    eval_every: str = ruled("", EVERY)  # "N" steps or "Nep" epochs: test accuracy (raw, EMA) and small-fd of 1000
                                        # samples while training, to TensorBoard and log.jsonl ("" = only at the end)
    keep_every: str = ruled("", EVERY)  # "N" steps or "Nep" epochs: keep checkpoints/ema-<step>.safetensors
    compile: bool = False             # torch.compile the model (on CUDA with CUDA graphs, mode reduce-overhead)
    grad_accum: int = ruled(1, ints(1, 1 << 20))  # micro-batches per step: batch_size is split into processes x
                                                  # grad_accum pieces; the same update as one batch
    threads: int = ruled(0, ints(0, 4096))  # CPU threads: 0 = the CPUs this process may use (affinity, cgroup quota),
                                            # fewer while other processes run on them (threads.py); N = exactly N

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
                if f"{section}.{key}" in REMOVED or f"{section}.{key}" in REMOVED_OUTPUTS:
                    continue                                     # runs written before these options were removed
                _set_field(cfg, section, key, value)
        cfg.model.plus = cfg.model.plus or _removed_options(d)
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


RULES: dict[str, tuple] = {f"{section}.{f.name}": f.metadata["rule"]
                           for section, cls in (("model", ModelConfig), ("diffusion", DiffusionConfig),
                                                ("data", DataConfig), ("train", TrainConfig))
                           for f in fields(cls) if "rule" in f.metadata}


def _removed_options(d: dict[str, Any]) -> bool:
    """Check the options of a config written before they were removed (REMOVED): each must hold the value hybvit
    now always uses, or, for the four of PLUS_KEYS, all four the -plus values (then: True, the run is model.plus)."""
    held = {f"{s}.{k}": v for s in Config.SECTIONS if isinstance(d.get(s), dict)
            for k, v in d[s].items() if f"{s}.{k}" in REMOVED}
    plus = all(held.get(k) == v for k, v in PLUS_KEYS.items())
    for key, value in held.items():
        if value != REMOVED[key] and not (plus and key in PLUS_KEYS):
            raise HybvitError(f"this run was trained with {key}={value}, an option hybvit no longer has "
                              f"(docs/architecture.md lists what became of each); train it again with this version")
    return plus


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
