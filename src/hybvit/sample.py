"""Loading a trained run and drawing samples from it; grids as PNG (sample files: samplefiles.py).

  run = load_run("runs/digits")                    # EMA weights, config, diffusion
  x = run.sample(16, sampler="ddim", steps=50)    # float (16, C, H, W) in [-1, 1]
  logits = run.classify(images)                    # uint8 or [-1, 1] float images
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from . import distributed
from .config import Config
from .data import to_float, to_uint8
from .diffusion import GaussianDiffusion
from .errors import HybvitError
from .model import ViT
from .precision import autocast, enable_tf32, resolve_device


def eps_function(model: ViT, diffusion: GaussianDiffusion, amp: str = "auto", device="cpu",
                 eps_scale: float = 1.0, labels: torch.Tensor | None = None, cfg_scale: float = 1.0):
    """The model's denoiser as the noise predictor eps(x_t, t) that the samplers, guidance and the likelihood
    bound use: bf16 autocast as the run was trained, float32 out, v-prediction converted to eps.

    eps_scale (samplers only; 1 = off): divide the predicted noise by this constant, "epsilon scaling" (Ning et al.,
    2023, Elucidating the exposure bias in diffusion models). During sampling the network sees its own slightly
    wrong x_t rather than true q(x_t | x0) inputs and over-predicts the noise, so it removes too much of it and
    the samples come out smoother and less varied than the data; a scale a little above 1 (1.005-1.02) offsets it
    with no training. On digits-hybvit-plus it lowered the pixel-FD on every one of 6 sample seeds
    (docs/results/digits-plus-recipe.md).

    labels (model.class_cond only): the class of each image of the batch, (B,); None = the unconditional
    denoiser ("no label"). cfg_scale w (with labels; 1 = off): classifier-free guidance (Ho & Salimans, 2022),
    out = out_u + w (out_y - out_u) from the conditional and the "no label" outputs of one doubled batch."""
    if cfg_scale != 1.0 and not model.cfg.class_cond:     # every sampling path comes through here
        raise HybvitError("--cfg-scale needs a class-conditional run (trained with --set model.class_cond=true); "
                          "this one is not, so leave it at 1")
    device = torch.device(device)
    guided = labels is not None and cfg_scale != 1.0

    def net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with autocast(amp, device):
            if not guided:
                return model.denoise(x.float(), t, y=labels).float()
            y2 = torch.cat([labels, torch.full_like(labels, model.cfg.num_classes)])  # (2B,): y, then "no label"
            out_y, out_u = model.denoise(torch.cat([x.float()] * 2), torch.cat([t, t]), y=y2).float().chunk(2)
            return out_u + cfg_scale * (out_y - out_u)             # linear, so the same for eps and v outputs
    eps = diffusion.eps_model(net)
    if eps_scale != 1.0:
        return lambda x, t: eps(x, t) / eps_scale
    return eps


@torch.no_grad()
def draw_samples(model: ViT, diffusion: GaussianDiffusion, n: int, sampler: str = "ddim", steps: int = 50,
                 eta: float = 0.0, seed: int = 0, device="cpu", amp: str = "auto", batch_size: int = 500,
                 progress: bool = False, order: int = 2, spacing: str = "logsnr",
                 shard: tuple[int, int] = (0, 1), eps_scale: float = 1.0, label: int | None = None,
                 cfg_scale: float = 1.0, guide: Callable | None = None, uint8: bool = False) -> torch.Tensor:
    """n samples (n, C, H, W) in [-1, 1], drawn in batches; batch k uses the generator seeded with seed + k.
    uint8: each batch as uint8 images as soon as it is drawn (to_uint8; a quarter of the memory, and of what
    torchrun processes exchange inside shared_work).
    eps_scale: epsilon scaling of the predicted noise (see eps_function; 1 = off).
    guide: eps_model -> eps_model, a change of each step's noise prediction (guidance.py's self-guidance).
    label (model.class_cond only): every sample of this class; None: sample i gets class i mod K, so every class
    has n // K or one more. cfg_scale: classifier-free guidance of a class-conditional model (1 = off).

    shard=(r, K): only the batches k = r, r + K, r + 2K, ... (concatenated in that order), what rank r of K
    processes draws; `gather_samples` interleaves the K shares back into exactly what one process draws."""
    cfg = model.cfg
    device = torch.device(device)
    was_training = model.training
    model.eval()

    rank, world = shard
    count = -(-n // batch_size)
    mine = ([k for k in range(count) if k % world == rank] if shard != (0, 1)
            else distributed.my_batches(count))          # inside shared_work: this rank's batches
    per_batch = diffusion.T if sampler == "ancestral" else steps
    bar = tqdm(total=len(mine) * per_batch, desc=f"sampling {n} images", unit="step", leave=False,
               mininterval=1.0, disable=None) if progress else None          # disable=None: only on a terminal

    def advance(it):                                        # one bar over every batch: an ETA for the whole job
        for i in it:
            yield i
            bar.update(1)

    def one(start: int, stop: int) -> torch.Tensor:            # batch k = start // batch_size
        b, k = stop - start, start // batch_size
        g = torch.Generator().manual_seed(seed + k)
        labels = sample_labels(cfg, start, b, label, device)
        eps_model = eps_function(model, diffusion, amp, device, eps_scale=eps_scale, labels=labels,
                                 cfg_scale=cfg_scale)
        if guide is not None:
            eps_model = guide(eps_model)
        x = diffusion.sample(eps_model, (b, cfg.channels, cfg.image_size, cfg.image_size), sampler=sampler,
                             steps=steps, eta=eta, generator=g, device=device, progress=advance if bar else None,
                             order=order, spacing=spacing)
        return to_uint8(x).cpu() if uint8 else x.float().clamp(-1, 1).cpu()
    if shard != (0, 1):
        out = [one(k * batch_size, min(n, (k + 1) * batch_size)) for k in mine]
    else:
        out = distributed.map_batches(n, batch_size, one)
    if bar is not None:
        bar.close()
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, cfg.channels, cfg.image_size, cfg.image_size,
                                                  dtype=torch.uint8 if uint8 else torch.float32)


def sample_labels(cfg, start: int, b: int, label: int | None, device) -> torch.Tensor | None:
    """The classes of samples start .. start + b - 1 for a class-conditional model (None for any other): all
    `label`, or i mod K when label is None."""
    if not cfg.class_cond:
        return None
    if label is not None:
        return torch.full((b,), label, dtype=torch.long, device=device)
    return (torch.arange(start, start + b, device=device) % cfg.num_classes).long()


@torch.no_grad()
def draw_balanced(model: ViT, diffusion: GaussianDiffusion, n: int, batch_size: int = 500, seed: int = 0,
                  device="cpu", amp: str = "auto", max_factor: int = 20, **kw) -> torch.Tensor:
    """n samples with the same number of each class (n // K, the first n % K classes one more), as the model's own
    classifier labels them: batches are drawn as draw_samples draws them (batch k seeded with seed + k) and each
    sample is kept while its class is short. This resamples the generator's class marginal to the uniform one
    (importance resampling by the hybrid model's discriminative half; no second model). Only for HybViT runs, whose
    classifier was trained; draws at most max_factor * n samples before giving up with an error."""
    cfg = model.cfg
    K = cfg.num_classes
    quota = torch.full((K,), n // K, dtype=torch.long)
    quota[: n % K] += 1
    kept, drawn, k = [], 0, 0
    was_training = model.training
    model.eval()
    try:
        while int(quota.sum()) > 0:
            if drawn >= max_factor * n:
                short = [c for c in range(K) if quota[c] > 0]
                raise HybvitError(f"--balance-classes: after {drawn} samples the model still generated too few of "
                                  f"class(es) {short}; it rarely draws them, so sample without --balance-classes")
            x = draw_samples(model, diffusion, batch_size, seed=seed + k, device=device, amp=amp,
                             batch_size=batch_size, **kw)
            labels = classify_batches(model, x, batch_size, amp).argmax(1)
            for i, c in enumerate(labels.tolist()):
                if quota[c] > 0:
                    quota[c] -= 1
                    kept.append(x[i])
            drawn += len(x)
            k += 1
    finally:
        model.train(was_training)                                 # also when the draw gives up
    return torch.stack(kept)


def gather_samples(ctx, x: torch.Tensor, n: int, batch_size: int) -> torch.Tensor | None:
    """Put the shares of `draw_samples(..., shard=(ctx.rank, ctx.world))` back together on rank 0: uint8 images
    (n, C, H, W) in the order one process draws them (batch k from rank k mod K); None on the other ranks. The
    shares travel as uint8, the levels the output files hold (to_float of them gives [-1, 1] images back)."""
    shares = distributed.gather(ctx, to_uint8(x))
    if shares is None:
        return None
    sizes = [min(batch_size, n - start) for start in range(0, n, batch_size)]
    pieces = [list(share.split([b for k, b in enumerate(sizes) if k % len(shares) == r]))
              for r, share in enumerate(shares)]
    return torch.cat([pieces[k % len(shares)][k // len(shares)] for k in range(len(sizes))])


@torch.no_grad()
def classify_batches(model: ViT, images: torch.Tensor, batch_size: int = 500, amp: str = "auto",
                     progress: str | None = None) -> torch.Tensor:
    """Logits (N, classes) as float32 on the CPU for images (N, C, H, W), uint8 in [0, 255] or float in [-1, 1],
    classified batch_size at a time on the model's device in eval mode (its mode is restored after); progress: the
    label of a progress bar (on a terminal), None for none."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    count = -(-len(images) // batch_size)
    bar = (tqdm(total=len(distributed.my_batches(count)), desc=progress, unit="batch", leave=False, mininterval=1.0,
                disable=None) if progress is not None else None)

    def one(start: int, stop: int) -> torch.Tensor:
        xb = images[start:stop].to(device)
        xb = to_float(xb) if xb.dtype == torch.uint8 else xb.float()
        with autocast(amp, device):
            logits = model.classify(xb).float().cpu()
        if bar is not None:
            bar.update(1)
        return logits
    out = distributed.map_batches(len(images), batch_size, one)      # split over the ranks inside shared_work
    if bar is not None:
        bar.close()
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, model.cfg.num_classes)


def make_grid(x: torch.Tensor, nrow: int | None = None, min_size: int = 32, pad: int = 1) -> torch.Tensor:
    """Images (N, C, H, W) in [-1, 1] -> one uint8 grid (H', W', 3); images under min_size pixels are enlarged
    by an integer factor (nearest neighbour) so small data such as 8x8 digits stays visible."""
    import torchvision.utils as vutils
    n = len(x)
    nrow = nrow or max(1, int(round(n ** 0.5)))
    scale = max(1, -(-min_size // x.shape[-1]))
    if scale > 1:
        x = x.repeat_interleave(scale, dim=-1).repeat_interleave(scale, dim=-2)
    img = to_uint8(x)
    if img.shape[1] == 1:
        img = img.repeat(1, 3, 1, 1)
    grid = vutils.make_grid(img, nrow=nrow, padding=pad, pad_value=255)
    return grid.permute(1, 2, 0).contiguous()


def save_png(path: Path, grid: torch.Tensor) -> None:
    arr = grid.numpy() if isinstance(grid, torch.Tensor) else grid
    ckpt.atomic_write(Path(path), lambda tmp: Image.fromarray(arr).save(tmp, format="PNG"))


@dataclass
class Run:
    """A trained model ready to use: EMA weights, its configuration and its diffusion."""
    model: ViT
    config: Config
    diffusion: GaussianDiffusion
    device: torch.device
    path: Path | None = None

    def classify(self, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
        """Logits (N, classes) for images (N, C, H, W): uint8 in [0, 255] or float in [-1, 1]."""
        if images.dim() == 3:
            images = images[:, None]
        shape = (self.model.cfg.channels, self.model.cfg.image_size, self.model.cfg.image_size)
        if tuple(images.shape[1:]) != shape:
            raise HybvitError(f"images have shape {tuple(images.shape[1:])} but the model takes {shape} (C,H,W)")
        return classify_batches(self.model, images, batch_size, self.config.train.amp)

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self.classify(images).argmax(1)

    def sample(self, n: int, sampler: str = "ddim", steps: int = 50, eta: float = 0.0, seed: int = 0,
               batch_size: int = 500, progress: bool = False, order: int = 2, spacing: str = "logsnr",
               eps_scale: float = 1.0, balance_classes: bool = False, cfg_scale: float = 1.0,
               uint8: bool = False) -> torch.Tensor:
        """n images in [-1, 1] (uint8: as uint8 images, converted batch by batch): sampler ancestral (all T steps), ddim or dpm-solver++ (`steps` network
        evaluations; `order` 1-3 and `spacing` logsnr|time for dpm-solver++); eps_scale > 1: epsilon scaling;
        balance_classes: the same number of each class, by the model's own classifier (draw_balanced);
        cfg_scale: classifier-free guidance of a class-conditional model (model.class_cond; 1 = off)."""
        if balance_classes:
            if self.config.train.mode != "hybvit":
                raise HybvitError(f"--balance-classes needs a HybViT run (its classifier labels the samples); "
                                  f"this run is {self.config.train.mode}")
            x = draw_balanced(self.model, self.diffusion, n, batch_size=batch_size, seed=seed, device=self.device,
                              amp=self.config.train.amp, sampler=sampler, steps=steps, eta=eta, order=order,
                              spacing=spacing, eps_scale=eps_scale, cfg_scale=cfg_scale)
            return to_uint8(x) if uint8 else x
        return draw_samples(self.model, self.diffusion, n, sampler=sampler, steps=steps, eta=eta, seed=seed,
                            device=self.device, amp=self.config.train.amp, batch_size=batch_size, progress=progress,
                            order=order, spacing=spacing, eps_scale=eps_scale, cfg_scale=cfg_scale, uint8=uint8)


def check_weights_fit(cfg: Config, weights: dict[str, torch.Tensor], path: str | Path) -> None:
    """The weights must have exactly the names and shapes of the model cfg describes, compared on the meta device
    (no memory), so a config that claims a huge model is refused before anything is allocated."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in ViT(cfg.model).state_dict().items()}
    got = {k: tuple(v.shape) for k, v in weights.items()}
    if got != expected:
        diff = sorted(set(got) ^ set(expected)) or [k for k in expected if got[k] != expected[k]]
        k = diff[0]
        raise HybvitError(f"weights in '{path}' do not fit the model of its config ({len(diff)} tensor(s) differ, "
                          f"e.g. {k}: {got.get(k, 'missing')} in the file, {expected.get(k, 'none')} in the model); "
                          f"the file and its config do not belong together")


def load_run_config(run_dir: str | Path) -> Config:
    """The configuration of a run directory (its config.json), without loading any weights."""
    path = Path(run_dir) / "config.json"
    if not Path(run_dir).is_dir():
        raise HybvitError(f"run directory '{run_dir}' does not exist; give the --out folder of a training run")
    if not path.exists():
        raise HybvitError(f"'{run_dir}' has no config.json; it is not a hybvit run directory")
    cfg = Config.from_saved(ckpt.read_json(path, "run config"), f"run '{run_dir}'")
    cfg.validate()
    return cfg


def load_run(run_dir: str | Path | None = None, checkpoint: str | Path | None = None,
             device: str = "auto") -> Run:
    """Load the EMA weights of a run directory, of a model folder written by `hybvit export`, or of one checkpoint
    file (.safetensors or last.pt)."""
    if (run_dir is None) == (checkpoint is None):
        raise HybvitError("give exactly one of --run DIR or --checkpoint PATH")
    path = weights_file(run_dir) if run_dir is not None else Path(checkpoint)
    weights, cfg_dict = ckpt.load_weights(path)
    return run_from_weights(weights, cfg_dict, device, path, run_dir)


def weights_file(run_dir: str | Path) -> Path:
    """The EMA weights of a run directory or of a model folder written by `hybvit export`."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise HybvitError(f"run directory '{run_dir}' does not exist; give the --out folder of a training run")
    candidates = [run_dir / "model.safetensors",                  # a model folder of `hybvit export`
                  run_dir / "checkpoints" / "ema.safetensors", run_dir / "checkpoints" / "last.pt"]
    path = next((p for p in candidates if p.exists()), None)
    if path is None:
        raise HybvitError(f"'{run_dir}' has no checkpoints/ema.safetensors, checkpoints/last.pt or "
                          f"model.safetensors; it is not a (finished or checkpointed) hybvit run or model folder")
    return path


def run_from_weights(weights: dict[str, torch.Tensor], cfg_dict: dict, device: str = "auto",
                     path: str | Path = "weights", run_dir: str | Path | None = None) -> Run:
    """A Run from EMA weights and the config dict stored with them (what `load_run` reads from a file)."""
    cfg = Config.from_saved(cfg_dict, f"'{path}'")
    cfg.validate()
    dev = resolve_device(device)
    enable_tf32(dev)
    check_weights_fit(cfg, weights, path)                      # before the model is built at the config's size
    model = ViT(cfg.model)
    model.load_state_dict(weights)
    model.to(dev).eval().requires_grad_(False)
    return Run(model, cfg, GaussianDiffusion.from_config(cfg.diffusion), dev, Path(run_dir) if run_dir else None)


__all__ = ["Run", "load_run", "load_run_config", "run_from_weights", "weights_file", "check_weights_fit", "draw_samples", "classify_batches",
           "gather_samples", "make_grid", "save_png"]
