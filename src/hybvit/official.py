"""The paper's own checkpoints (github sndnyang/Diffusion_ViT) in hybvit: read, map onto hybvit's ViT, import.

The paper's code saves ``{'model_state_dict': GaussianDiffusion(ViT).state_dict()}``: in ``ema_checkpoint.pth`` the
EMA weights it evaluates, in ``checkpoint.pth`` the raw model beside its optimizer, scheduler and epoch. Its keys
are ``denoise_fn.*`` for the ViT (``denoise_fn.module.*`` when it trained under DataParallel) and the diffusion's
schedule buffers (``betas``, ``alphas_cumprod``, ...). Nothing in the file names the configuration; it follows from
the tensor shapes and the code's one rule for heads (models/create_model.py: 12 when dim % 12 == 0, else 8):

  pos_embedding (1, N+1, D)            tokens and width
  to_patch_embedding.1.weight (D, PPC) P*P*C, with C 3 or 1 (never both: 3 k^2 is not a square)
  mlp_head.1.weight (K, D)             classes
  transformer.layers.<i>               depth
  time_mlp.1.weight (Th, D)            time MLP width (4 (N+1) in the paper's code)

`official_model(state)` gives hybvit's weights (official_to_hybvit) and config (infer_model_config); the identical
outputs are checked against what the official code computed, in tests/test_official.py.
"""
from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .config import DEFAULT_PRESET, Config, ModelConfig, preset_config
from .diffusion import GaussianDiffusion
from .errors import HybvitError
from .model import MLP_RATIO, ViT
from .provenance import provenance
from .untrusted import load_torch_file

FIX = "give the checkpoint.pth or ema_checkpoint.pth that the paper's code (gevit_main.py) saved"

# official key (after denoise_fn. / module.) -> hybvit key
RENAMES = [(re.compile(a), b) for a, b in [
    (r"pos_embedding", "pos_embed"),
    (r"cls_token", "cls_token"),
    (r"time_mlp\.1\.(weight|bias)", r"time_mlp.0.\1"),
    (r"time_mlp\.3\.(weight|bias)", r"time_mlp.2.\1"),
    (r"to_patch_embedding\.1\.(weight|bias)", r"patch_embed.\1"),
    (r"recon_head\.0\.(weight|bias)", r"out.\1"),
    (r"transformer\.layers\.(\d+)\.0\.norm\.(weight|bias)", r"blocks.\1.norm1.\2"),
    (r"transformer\.layers\.(\d+)\.0\.fn\.to_qkv\.weight", r"blocks.\1.attn.qkv.weight"),
    (r"transformer\.layers\.(\d+)\.0\.fn\.to_out\.0\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (r"transformer\.layers\.(\d+)\.1\.norm\.(weight|bias)", r"blocks.\1.norm2.\2"),
    (r"transformer\.layers\.(\d+)\.1\.fn\.net\.0\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
    (r"transformer\.layers\.(\d+)\.1\.fn\.net\.3\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
    (r"transformer\.time_layers\.(\d+)\.1\.(weight|bias)", r"blocks.\1.modulation.\2"),
    (r"mlp_head\.0\.(weight|bias)", r"head.0.\1"),
    (r"mlp_head\.1\.(weight|bias)", r"head.1.\1"),
]]
SCHEDULE_KEYS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                 "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                 "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                 "posterior_mean_coef1", "posterior_mean_coef2")


@dataclass
class OfficialCheckpoint:
    vit: dict[str, torch.Tensor]          # the ViT's tensors, official names without denoise_fn. / module.
    schedule: dict[str, torch.Tensor]     # the diffusion's buffers
    kind: str                             # "ema" (ema_checkpoint.pth) or "raw" (checkpoint.pth: the trained model)
    epoch: int | None                     # checkpoint.pth's epoch
    data_parallel: bool
    sha256: str


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def is_official_file(path: Path) -> bool:
    """A file that may be the paper code's checkpoint (a torch.save file not written by hybvit)."""
    return Path(path).is_file() and Path(path).suffix in (".pth", ".pt") and Path(path).name != "last.pt"


def read_official(path: str | Path) -> OfficialCheckpoint:
    """Read an official checkpoint: tensors only, no code, nothing allocated that the file merely claims."""
    path = Path(path)
    obj = load_torch_file(path, FIX)
    state = obj.get("model_state_dict") if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not state:
        raise HybvitError(f"'{path}' has no 'model_state_dict'; it is not a checkpoint of the paper's code: {FIX}")
    bad = [str(k) for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise HybvitError(f"'{path}': model_state_dict entry '{bad[0][:80]}' is not a named tensor; {FIX}")
    vit, schedule, data_parallel = {}, {}, False
    for key, value in state.items():
        if key in SCHEDULE_KEYS:
            schedule[key] = value
        elif key.startswith("denoise_fn.module."):
            vit[key[len("denoise_fn.module."):]], data_parallel = value, True
        elif key.startswith("denoise_fn."):
            vit[key[len("denoise_fn."):]] = value
        else:
            raise HybvitError(f"'{path}': unknown key '{key[:80]}' (neither the ViT's denoise_fn.* nor a schedule "
                              f"buffer); {FIX}")
    epoch = obj.get("epoch")
    return OfficialCheckpoint(vit, schedule, "raw" if "optimizer_state_dict" in obj else "ema",
                              int(epoch) if isinstance(epoch, (int, float)) else None, data_parallel,
                              sha256_file(path))


def _shape(vit: dict[str, torch.Tensor], key: str, dims: int) -> tuple[int, ...]:
    if key not in vit:
        raise HybvitError(f"the checkpoint has no 'denoise_fn.{key}', which every model of the paper's code has; {FIX}")
    shape = tuple(vit[key].shape)
    if len(shape) != dims:
        raise HybvitError(f"'denoise_fn.{key}' has shape {shape}, not the {dims} dimensions the paper's code gives "
                          f"it; the file is damaged: {FIX}")
    return shape


def infer_model_config(vit: dict[str, torch.Tensor]) -> ModelConfig:
    """The ModelConfig of an official ViT from its tensor shapes and the paper code's rule for heads."""
    _, tokens, dim = _shape(vit, "pos_embedding", 3)
    grid = math.isqrt(max(tokens - 1, 0))
    if tokens < 2 or grid * grid != tokens - 1:
        raise HybvitError(f"'denoise_fn.pos_embedding' has {tokens} positions, not 1 + a square grid of patches; "
                          f"{FIX}")
    _, patch_values = _shape(vit, "to_patch_embedding.1.weight", 2)
    fits = [(c, math.isqrt(patch_values // c)) for c in (3, 1) if patch_values % c == 0
            and math.isqrt(patch_values // c) ** 2 == patch_values // c]
    if not fits:
        raise HybvitError(f"'denoise_fn.to_patch_embedding.1.weight' takes {patch_values} values per patch, not "
                          f"P*P*C with 1 or 3 channels; {FIX}")
    channels, patch = fits[0]
    classes, _ = _shape(vit, "mlp_head.1.weight", 2)
    time_hidden, _ = _shape(vit, "time_mlp.1.weight", 2)
    hidden, _ = _shape(vit, "transformer.layers.0.1.fn.net.0.weight", 2)
    depth = 1 + max(int(m.group(1)) for k in vit if (m := re.match(r"transformer\.layers\.(\d+)\.", k)))
    heads = 12 if dim % 12 == 0 else 8                     # models/create_model.py
    if dim % heads:
        raise HybvitError(f"width {dim} does not split into the {heads} heads the paper's code gives it (its "
                          f"attention is then wider than the model, which hybvit's ViT does not build); {FIX}")
    if hidden != MLP_RATIO * dim or time_hidden != 4 * tokens:
        raise HybvitError(f"the MLP is {hidden} wide and the time MLP {time_hidden} for width {dim} and {tokens} "
                          f"tokens; hybvit builds the paper's widths ({MLP_RATIO * dim} and {4 * tokens}); {FIX}")
    return ModelConfig(image_size=grid * patch, channels=channels, patch_size=patch, num_classes=classes, dim=dim,
                       depth=depth, heads=heads)


def official_to_hybvit(vit: dict[str, torch.Tensor], model_cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Rename the official ViT's tensors to hybvit's and check them, every one, against ViT(model_cfg): an unknown,
    missing or misshapen tensor is a one-line error naming it."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in ViT(model_cfg).state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    for key, value in vit.items():
        new = next((rx.sub(to, key) for rx, to in RENAMES if rx.fullmatch(key)), None)
        if new is None or new not in expected:
            raise HybvitError(f"unknown tensor 'denoise_fn.{key}' {tuple(value.shape)}: not part of the paper's "
                              f"ViT as hybvit builds it (a variant such as SPT, LSA or TimeEmbMLP?); {FIX}")
        if tuple(value.shape) != expected[new]:
            raise HybvitError(f"tensor 'denoise_fn.{key}' has shape {tuple(value.shape)} where the model needs "
                              f"{expected[new]} (model: {describe(model_cfg)}); {FIX}")
        out[new] = value.float().contiguous()
    missing = [k for k in expected if k not in out]
    if missing:
        raise HybvitError(f"the checkpoint lacks {len(missing)} tensor(s) of the model ({describe(model_cfg)}), "
                          f"e.g. hybvit's '{missing[0]}' {expected[missing[0]]}; {FIX}")
    return out


def match_schedule(schedule: dict[str, torch.Tensor]) -> str:
    """The hybvit schedule ('cosine' or 'linear') whose buffers equal the file's to float32 rounding; refuses when
    none does or a buffer is missing. posterior_log_variance_clipped[0] is skipped: the paper's code stores
    log(1e-20) there, a value its sampler never uses (hybvit, as its bits/dim code, uses the t = 1 value)."""
    missing = [k for k in SCHEDULE_KEYS if k not in schedule]
    if missing:
        raise HybvitError(f"the checkpoint lacks the diffusion buffer '{missing[0]}'; {FIX}")
    T = schedule["betas"].numel()
    if T < 2 or any(v.shape != (T,) for v in schedule.values()):
        raise HybvitError(f"the checkpoint's diffusion buffers are not all of one length T >= 2; {FIX}")
    worst = {}
    for name in ("cosine", "linear"):
        d = GaussianDiffusion(T, name)
        ours = {k: getattr(d, k, None) for k in SCHEDULE_KEYS}
        ours["log_one_minus_alphas_cumprod"] = torch.log1p(-d.alphas_cumprod)
        rel = []
        for k, v in schedule.items():
            a, b = v.double(), ours[k]
            if k == "posterior_log_variance_clipped":
                a, b = a[1:], b[1:]
            rel.append(((a - b).abs() / b.abs().clamp(min=1e-30)).max().item())
        worst[name] = max(rel)
        if worst[name] <= 1e-5:               # float32 rounding is 6e-8 relative; another schedule differs at 1e-2+
            return name
    raise HybvitError(f"the checkpoint's noise schedule (T = {T}) is neither hybvit's cosine nor its linear schedule "
                      f"(relative difference {min(worst.values()):.1e} at best); hybvit cannot sample it faithfully")


# The presets of the paper's configurations; an imported model takes the data and training sections of the one with
# its image size, channels and classes.
PAPER_PRESETS = ("cifar10-hybvit", "cifar100-hybvit", "imagenet32-hybvit", "tiny-imagenet-hybvit", "stl10-hybvit",
                 "celeba128-genvit")


def import_config(oc: OfficialCheckpoint, preset: str | None, source: Path) -> Config:
    """The run configuration of an official checkpoint: a named preset whose model must fit every tensor, or the
    model inferred from the shapes with the data and training sections of the paper preset of its image shape."""
    schedule = match_schedule(oc.schedule)
    if preset:
        cfg = preset_config(preset)
        official_to_hybvit(oc.vit, cfg.model)                      # every tensor against the preset's model
        if cfg.diffusion.schedule != schedule or cfg.diffusion.timesteps != oc.schedule["betas"].numel():
            raise HybvitError(f"the checkpoint's noise schedule ({schedule}, T {oc.schedule['betas'].numel()}) is "
                              f"not preset {preset}'s ({cfg.diffusion.schedule}, T {cfg.diffusion.timesteps}); "
                              f"import it without --preset")
    else:
        model = infer_model_config(oc.vit)
        shape = lambda m: (m.image_size, m.channels, m.num_classes)          # noqa: E731
        base = next((p for p in PAPER_PRESETS if shape(preset_config(p).model) == shape(model)), None)
        cfg = preset_config(base or DEFAULT_PRESET)
        same = base is not None and cfg.model == model
        cfg.model, cfg.preset = model, (base if same else "")
        cfg.diffusion.schedule, cfg.diffusion.timesteps = schedule, oc.schedule["betas"].numel()
        if base is None:
            cfg.train.mode = "hybvit" if model.num_classes > 1 else "genvit"
            cfg.notes.append(f"no preset has {model.image_size}x{model.image_size}x{model.channels} images with "
                             f"{model.num_classes} classes: give --data to evaluate or train it")
        elif not same:
            cfg.notes.append(f"data and training settings of preset {base}; the model is the file's "
                             f"({describe(model)})")
    cfg.train.amp = "fp32"                                         # the paper's code ran in fp32
    weights = ("the EMA weights" if oc.kind == "ema" else
               f"the raw (not EMA) weights of epoch {oc.epoch}; its optimizer and scheduler are not used")
    cfg.notes.insert(0, f"imported from the paper's code's checkpoint '{source.name}' (sha256 {oc.sha256}): "
                        f"{weights}{', saved under DataParallel' if oc.data_parallel else ''}; precision fp32, as "
                        f"that code ran")
    cfg.validate()
    return cfg


def import_official(path: str | Path, out: str | Path, preset: str | None = None) -> tuple[Path, Config]:
    """`hybvit import`: write the run folder `out` (new or empty) from an official checkpoint, all or nothing:
    config.json, checkpoints/ema.safetensors (what sample, evaluate, export and train --init-from read) and
    metrics.json with the source file's sha256 in its provenance."""
    path, out = Path(path), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise HybvitError(f"--out '{out}' exists and is not an empty folder; give a new folder for the run")
    ckpt.check_can_create(out)
    oc = read_official(path)
    cfg = import_config(oc, preset, path)
    weights = official_to_hybvit(oc.vit, cfg.model)
    record = {"file": str(path.resolve()), "sha256": oc.sha256, "weights": oc.kind, "epoch": oc.epoch,
              "data_parallel": oc.data_parallel}
    metrics = {"imported_from": record, "provenance": {**provenance("cpu", amp="fp32"), "source": record}}

    def write(folder: Path) -> None:
        ckpt.write_json(folder / "config.json", cfg.to_dict())
        ckpt.save_weights(folder / "checkpoints" / "ema.safetensors", weights, cfg.to_dict())
        ckpt.write_json(folder / "metrics.json", metrics)
    ckpt.write_folder(out, write)
    return out, cfg


def describe(m: ModelConfig) -> str:
    return (f"{m.image_size}x{m.image_size}x{m.channels}, patch {m.patch_size}, {m.num_classes} classes, D {m.dim}, "
            f"depth {m.depth}, {m.heads} heads")


__all__ = ["OfficialCheckpoint", "read_official", "import_official", "import_config", "infer_model_config", "official_to_hybvit", "match_schedule",
           "is_official_file", "sha256_file", "describe"]
