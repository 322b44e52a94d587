"""Configuration: four dataclasses (model, diffusion, data, train) and the presets that fill them.

Presets live in ``presets.json`` next to this file (data, not code). A preset may name a ``base`` preset and
override any field. ``--set section.key=value`` (or a bare ``key=value`` when the key is unique) overrides a
field from the command line; values are parsed with the field's type.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from typing import Any

from .errors import HybvitError

POLICIES = ("none", "cifar10", "imagenet", "svhn", "rand")    # data.autoaugment
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
MODES = ("vit", "genvit", "hybvit")


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
    augment_cond: bool = False        # the denoiser is told which geometric transform (data.diffusion_augment) each
                                      # training image got (an embedding joins the time features, as EDM's
                                      # augmentation labels); sampling asks for none, so nothing leaks

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def validate(self) -> None:
        if self.image_size % self.patch_size != 0:
            raise HybvitError(
                f"image size {self.image_size} is not divisible by patch size {self.patch_size}; "
                f"pick a divisor, e.g. --set model.patch_size={_divisor_near(self.image_size, self.patch_size)}")
        if self.dim % self.heads != 0:
            raise HybvitError(f"model.dim {self.dim} is not divisible by model.heads {self.heads}; "
                              f"choose heads that divide dim")
        if self.time_cond not in ("token-scalar", "adaln", "none"):
            raise HybvitError(f"unknown model.time_cond '{self.time_cond}'; use token-scalar, adaln or none")
        if not 0 <= self.dropout < 1:
            raise HybvitError(f"model.dropout is a probability in [0, 1) (got {self.dropout})")
        if self.time_cond == "none" and not self.time_token:
            raise HybvitError("model.time_cond=none needs model.time_token=true, or the denoiser never sees t")
        for name in ("image_size", "channels", "patch_size", "num_classes", "dim", "depth", "heads"):
            if getattr(self, name) < 1:
                raise HybvitError(f"model.{name} must be >= 1 (got {getattr(self, name)})")


@dataclass
class DiffusionConfig:
    timesteps: int = 1000
    schedule: str = "cosine"          # cosine | linear
    loss: str = "l1"                  # l1 (the paper's code) | l2 (Eq. 15)
    prediction: str = "eps"           # eps (the paper) | v (v = alpha_t eps - sigma_t x0, Salimans & Ho 2022)
    weighting: str = "none"           # none (L_simple) | min-snr (min(SNR, gamma) weights, Hang et al. 2023)
    min_snr_gamma: float = 5.0

    def validate(self) -> None:
        if self.schedule not in ("cosine", "linear"):
            raise HybvitError(f"unknown diffusion.schedule '{self.schedule}'; use cosine or linear")
        if self.loss not in ("l1", "l2"):
            raise HybvitError(f"unknown diffusion.loss '{self.loss}'; use l1 or l2")
        if self.prediction not in ("eps", "v"):
            raise HybvitError(f"unknown diffusion.prediction '{self.prediction}'; use eps or v")
        if self.weighting not in ("none", "min-snr"):
            raise HybvitError(f"unknown diffusion.weighting '{self.weighting}'; use none or min-snr")
        if self.timesteps < 2:
            raise HybvitError("diffusion.timesteps must be >= 2")


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
        if self.autoaugment not in POLICIES:
            raise HybvitError(f"unknown data.autoaugment '{self.autoaugment}'; use one of {', '.join(POLICIES)}")
        if self.augment_backend not in ("batched", "torchvision"):
            raise HybvitError(f"unknown data.augment_backend '{self.augment_backend}'; use batched or torchvision")
        for name in ("random_erasing", "mix_prob", "diffusion_augment"):
            if not 0 <= getattr(self, name) <= 1:
                raise HybvitError(f"data.{name} is a probability: give a value in [0, 1]")


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
    epochs: float = 0.0               # budget: exactly one of epochs / steps / minutes is used
    steps: int = 0
    minutes: float = 0.0
    seed: int = 0
    amp: str = "auto"                 # auto (bf16 on CUDA, and on a CPU where bf16 matmuls measure >1.2x fp32) | bf16 | fp32
    device: str = "auto"              # auto | cpu | cuda | cuda:N
    log_every: int = 10
    ckpt_every: int = 500             # steps between checkpoints (and at the end)
    sample_every: int = 0             # steps between TensorBoard sample grids (0 = only at the end)
    num_samples: int = 100            # images in samples.png
    sampler: str = "ddim"             # ancestral | ddim | dpm-solver++ (order 2, logSNR steps): samples.png, FD
    sample_steps: int = 50
    fd_samples: int = 0               # >0: at the end, pixel-space Frechet distance of this many samples
    eval_batch_size: int = 500
    compile: bool = False
    compile_mode: str = "default"     # torch.compile mode: default | reduce-overhead (CUDA graphs) | max-autotune
                                      # | max-autotune-no-cudagraphs
    grad_accum: int = 1               # micro-batches per step: batch_size (the global batch, over all processes)
                                      # is split into processes x grad_accum pieces; the same update as one batch
    joint_pass: bool = False          # hybvit: CE and diffusion batches through one forward pass (bigger matmuls;
                                      # measured no gain on the CPU; for launch-bound GPUs)

    def validate(self) -> None:
        if self.mode not in MODES:
            raise HybvitError(f"unknown mode '{self.mode}'; use one of {', '.join(MODES)}")
        if self.optimizer not in ("adamw", "sgd", "muon"):
            raise HybvitError(f"unknown optimizer '{self.optimizer}'; use adamw, sgd or muon")
        if self.amp not in ("auto", "bf16", "fp32"):
            raise HybvitError(f"unknown amp '{self.amp}'; use auto, bf16 or fp32")
        if self.compile_mode not in COMPILE_MODES:
            raise HybvitError(f"unknown train.compile_mode '{self.compile_mode}'; use one of {', '.join(COMPILE_MODES)}")
        if self.sampler not in ("ancestral", "ddim", "dpm-solver++"):
            raise HybvitError(f"unknown sampler '{self.sampler}'; use ancestral, ddim or dpm-solver++")
        if self.batch_size < 1:
            raise HybvitError("train.batch_size must be >= 1")
        if not 0.0 <= self.label_dropout <= 1.0:
            raise HybvitError(f"train.label_dropout must be in [0, 1] (got {self.label_dropout})")
        budgets = [b for b in (self.epochs, self.steps, self.minutes) if b]
        if len(budgets) > 1:
            raise HybvitError("give one training budget: --epochs, --steps or --minutes, not several")
        if any(b < 0 for b in (self.epochs, self.steps, self.minutes)):
            raise HybvitError("training budgets must be positive")
        if self.grad_accum < 1:
            raise HybvitError("train.grad_accum must be >= 1 (micro-batches per step; 1 = off)")


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
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Config":
        cfg = cls()
        for section in cls.SECTIONS:
            for key, value in d.get(section, {}).items():
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
                value = float(value)
            if float(value) != int(value):
                raise ValueError(value)
            value = int(value)
        elif kind == "float":
            value = float(value)
        else:
            value = str(value)
    except (ValueError, TypeError):
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
OWN_DATA_PRESET = "own-data"          # the default for --data npz:PATH / folder:PATH when no preset is named


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
