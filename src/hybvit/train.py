"""Training for the three modes (ViT, GenViT, HybViT), readable top to bottom.

  vit     L = CE(classify(aug(x)), y)
  genvit  L = L_simple(x0)                                       (Eq. 15, L1 by default as the paper's code)
  hybvit  L = CE(classify(aug(x)), y) + alpha * L_simple(x0')    (Eq. 23; x and x0' are independent batches,
                                                                  the diffusion batch is never augmented)

AdamW (lr 1e-3, wd 0.05), linear warm-up then cosine decay per iteration, gradient clipping 1.0, EMA 0.999:
what the paper's code ran. Batches, noise and timesteps come from generators seeded by (seed, step), so a
run resumed from any checkpoint ends with exactly the weights of one that was never interrupted (on the CPU).
"""
from __future__ import annotations

import contextlib
import functools
import copy
import math
import signal
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from . import checkpoint as ckpt
from . import distributed
from .augment import classifier_batch, diffusion_geometric
from .config import Config
from .data import Batches, ImageData, augment, step_generator, to_float
from .diffusion import GaussianDiffusion
from .errors import HybvitError
from .model import ViT


# ----------------------------------------------------------------------------- small pieces

class EMA:
    """Exponential moving average of all weights: ema <- d * ema + (1 - d) * model."""

    def __init__(self, model: torch.nn.Module, decay: float, warmup: bool = False):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.warmup = decay, warmup

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay
        ema_p = list(self.model.parameters())
        torch._foreach_lerp_(ema_p, [p.detach() for p in model.parameters()], 1 - d)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise HybvitError(f"device '{name}' requested but CUDA is not available; use --set train.device=cpu")
    return torch.device(name)


def bf16_pays(bf16_gflops: float, fp32_gflops: float, margin: float = 1.2) -> bool:
    """amp "auto" on a CPU: bf16 autocast only where this CPU multiplies bf16 matrices clearly faster than fp32.
    CPU flags do not tell: two hosts of this project's kind, both with AVX512-BF16, measured bf16 matmuls at 2.4-2.6x
    the fp32 rate on one (where the default digits run trained 1.4x faster in bf16, same accuracy and FD) and at
    0.5x on the other (where the digits-hybvit-plus step took 1.37x longer in bf16; README "Speed")."""
    return bf16_gflops > margin * fp32_gflops


@functools.lru_cache(maxsize=None)
def cpu_matmul_gflops(dtype: torch.dtype, n: int = 1024, reps: int = 3) -> float:
    """This CPU's rate for an n x n x n matmul in dtype, best of `reps` after one warm-up (about 0.1 s for both
    dtypes at n = 1024); measured once per process."""
    g = torch.Generator().manual_seed(0)              # a generator of its own: the global RNG stays untouched
    a, b = (torch.randn(n, n, generator=g).to(dtype) for _ in range(2))
    a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def use_bf16(cfg_amp: str, device: torch.device) -> bool:
    """amp "auto": bf16 on CUDA, and on a CPU where its measured bf16 matmul rate beats fp32's (bf16_pays); fp32
    otherwise. Under torchrun, train() takes rank 0's answer for every rank."""
    if cfg_amp == "auto":
        if device.type == "cuda":
            return True
        return device.type == "cpu" and bf16_pays(cpu_matmul_gflops(torch.bfloat16), cpu_matmul_gflops(torch.float32))
    return cfg_amp == "bf16"


def autocast(cfg_amp: str, device: torch.device):
    if use_bf16(cfg_amp, device):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def build_optimizer(model: torch.nn.Module, cfg: Config, device: torch.device,
                    amp: str = "fp32") -> torch.optim.Optimizer:
    """amp is the resolved precision ("bf16" or "fp32"); Muon's Newton-Schulz iteration runs in it."""
    t = cfg.train
    groups = _decay_groups(list(model.named_parameters()), t.weight_decay)
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, nesterov=True)
    extra = {"fused": True} if device.type == "cuda" else {}
    if t.optimizer == "muon":
        return MuonAdamW(model, t, extra, torch.bfloat16 if amp == "bf16" else torch.float32)
    return torch.optim.AdamW(groups, lr=t.lr, betas=(0.9, t.adam_beta2), **extra)


def _decay_groups(named: list[tuple[str, torch.Tensor]], weight_decay: float) -> list[dict]:
    """Two parameter groups: weight decay on the matrices, none on biases, norms, the positional embedding and the
    CLS token."""
    decays = lambda n, p: p.ndim >= 2 and "pos_embed" not in n and "cls_token" not in n
    return [{"params": [p for n, p in named if decays(n, p)], "weight_decay": weight_decay},
            {"params": [p for n, p in named if not decays(n, p)], "weight_decay": 0.0}]


def _muon_param(name: str, p: torch.Tensor) -> bool:
    """The transformer blocks' hidden weight matrices (attention, MLP, long-skip projections): what Muon is for.
    Embeddings, the output layer, the classifier head, the time MLP, the zero-initialised modulation, norms and
    biases stay with AdamW (Jordan et al. 2024)."""
    return p.ndim == 2 and (name.startswith("blocks.") or name.startswith("skip_proj.")) and "modulation" not in name


def newton_schulz(x: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float) -> torch.Tensor:
    """Muon's quintic Newton-Schulz iteration on a stack of wide matrices x (B, m, n), m <= n: each is scaled to
    Frobenius norm 1, then X <- aX + (bA + cA^2)X with A = XX^T, driving its singular values towards ~1."""
    a, b, c = coefficients
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = torch.bmm(x, x.mT)                                      # (B, m, m)
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)        # b A + c A^2
        x = torch.baddbmm(x, poly, x, beta=a)                          # a X + (b A + c A^2) X
    return x


def muon_lr_scale(adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """torch.optim.Muon's per-matrix learning-rate factor for each of its adjust_lr_fn options."""
    rows, cols = shape[:2]
    if adjust_lr_fn in (None, "original"):
        return math.sqrt(max(1.0, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    if adjust_lr_fn == "spectral_unclamped":
        return math.sqrt(rows / cols)
    return 1.0


# On torch < 2.9 the class is still defined (so the module imports), but MuonAdamW refuses train.optimizer=muon first.
class BatchedMuon(torch.optim.Muon if hasattr(torch.optim, "Muon") else torch.optim.Optimizer):
    """torch.optim.Muon's update (same hyper-parameters, state and checkpoints), computed faster on small models:
    the Newton-Schulz iteration runs once per shape on a stack of all the matrices of that shape (one batched matmul
    instead of one per matrix) and in ns_dtype. torch.optim.Muon always iterates in bf16, one matrix at a time; on a
    CPU whose bf16 matmuls are slower than fp32 that made Muon 19 % of the digits-hybvit-plus step (README "Speed")."""

    def __init__(self, params, ns_dtype: torch.dtype = torch.float32, **kwargs):
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            for p in params:
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            bufs = [self.state[p]["momentum_buffer"] for p in params]
            momentum = group["momentum"]
            torch._foreach_lerp_(bufs, grads, 1 - momentum)                       # buf <- mu buf + (1 - mu) g
            updates = torch._foreach_lerp(grads, bufs, momentum) if group["nesterov"] else bufs
            wide = [u.mT if u.size(0) > u.size(1) else u for u in updates]        # iterate on the wide orientation
            by_shape: dict[tuple, list[int]] = {}
            for i, w in enumerate(wide):
                by_shape.setdefault((tuple(w.shape), w.device, w.dtype), []).append(i)
            lr, wd = float(group["lr"]), group["weight_decay"]
            for idx in by_shape.values():
                stack = torch.stack([wide[i] for i in idx]).to(self.ns_dtype)
                ortho = newton_schulz(stack, group["ns_coefficients"], group["ns_steps"], group["eps"])
                for o, i in zip(ortho, idx):
                    p = params[i]
                    o = o.mT if p.size(0) > p.size(1) else o
                    p.mul_(1 - lr * wd)
                    p.add_(o.to(p.dtype), alpha=-lr * muon_lr_scale(group["adjust_lr_fn"], p.shape))
        return loss


class MuonAdamW:
    """train.optimizer=muon: Muon (orthogonalised momentum; BatchedMuon, torch >= 2.9) on the blocks' weight
    matrices, AdamW on every other parameter, behind one optimizer interface (param_groups, step, zero_grad,
    state_dict). Muon's step is rescaled to AdamW's update size (Liu et al. 2025, "match_rms_adamw"), so train.lr
    and train.weight_decay mean the same for both."""

    def __init__(self, model: torch.nn.Module, t, extra: dict, ns_dtype: torch.dtype = torch.float32):
        if not hasattr(torch.optim, "Muon"):
            raise HybvitError(f"train.optimizer=muon needs torch >= 2.9 (this is {torch.__version__}); "
                              f"upgrade torch or use --set train.optimizer=adamw")
        named = list(model.named_parameters())
        hidden = [p for n, p in named if _muon_param(n, p)]
        rest = [(n, p) for n, p in named if not _muon_param(n, p)]
        self.muon = BatchedMuon(hidden, ns_dtype=ns_dtype, lr=t.lr, weight_decay=t.weight_decay,
                                adjust_lr_fn="match_rms_adamw")
        self.adamw = torch.optim.AdamW(_decay_groups(rest, t.weight_decay), lr=t.lr, betas=(0.9, t.adam_beta2),
                                       **extra)

    @property
    def param_groups(self) -> list[dict]:
        # read each time: load_state_dict replaces the optimizers' group dicts
        return self.muon.param_groups + self.adamw.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        self.muon.step()
        self.adamw.step()

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != {"muon", "adamw"}:
            raise KeyError("not a Muon + AdamW state (keys 'muon', 'adamw')")
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])


def lr_at(step: int, total: int, warmup: int, lr: float, min_lr: float, schedule: str = "cosine") -> float:
    """Linear warm-up from ~0 over `warmup` steps, then decay to min_lr at `total`: cosine (the paper's code) or
    linear (straight to min_lr; Bergsma et al. 2025 find it at least as good as cosine for AdamW)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return min_lr + (lr - min_lr) * (1 - progress)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def steps_per_epoch(cfg: Config, n_train: int) -> int:
    b = cfg.train.diff_batch_size if cfg.train.mode == "genvit" else cfg.train.batch_size
    return max(1, (cfg.data.epoch_repeats * n_train) // min(b, n_train))


def planned_steps(cfg: Config, n_train: int) -> int | None:
    """Total steps from the budget; None for a wall-clock budget (estimated once training runs)."""
    t = cfg.train
    if t.steps:
        return int(t.steps)
    if t.epochs:
        return max(1, round(t.epochs * steps_per_epoch(cfg, n_train)))
    if t.minutes:
        return None
    raise HybvitError("no training budget: give --epochs, --steps or --minutes")


def warmup_steps(cfg: Config, n_train: int, total: int) -> int:
    w = cfg.train.warmup_epochs * steps_per_epoch(cfg, n_train)
    return max(1, int(min(w, cfg.train.warmup_max_frac * total)))


@torch.no_grad()
def accuracy(model: ViT, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500, amp: str = "auto") -> float:
    """Top-1 accuracy of model.classify on uint8 images x (N, C, H, W)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        xb = to_float(x[i:i + batch_size].to(device))
        with autocast(amp, device):
            correct += (model.classify(xb).argmax(1).cpu() == y[i:i + batch_size]).sum().item()
    model.train(was_training)
    return correct / max(1, len(x))


# ----------------------------------------------------------------------------- the run

class _StopFlag:
    """Ctrl-C / SIGTERM: finish the current step, write a checkpoint, exit cleanly (resume with --resume)."""

    def __init__(self) -> None:
        self.stop = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "_StopFlag":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not in the main thread
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.stop:  # a second Ctrl-C aborts at once
            raise KeyboardInterrupt
        self.stop = True

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def check_batch_split(cfg: Config, n_train: int, world: int = 1) -> None:
    """train.batch_size is the global batch of each branch; it must split evenly into world processes x
    train.grad_accum micro-batches (after the cap at the training-set size that Batches applies)."""
    t = cfg.train
    parts = world * t.grad_accum
    sizes = []
    if t.mode in ("vit", "hybvit"):
        sizes.append((Batches(n_train, t.batch_size, t.seed, 0, cfg.data.repeated_aug).batch_size, t.batch_size,
                      "batch_size"))
    if t.mode in ("genvit", "hybvit"):
        sizes.append((Batches(n_train, t.diff_batch_size, t.seed, 1).batch_size, t.diff_batch_size,
                      "diffusion_batch_size" if t.diffusion_batch_size else "batch_size"))
    for b, asked, key in sizes:
        if b % parts:
            capped = "" if b == asked else f" (train.{key} {asked} capped at the training set)"
            raise HybvitError(f"the global batch of {b} images{capped} does not split into {world} process(es) x "
                              f"train.grad_accum {t.grad_accum}; use a multiple of {parts}, e.g. "
                              f"--set train.{key}={max(parts, round(b / parts) * parts)}")


class _Objective(torch.nn.Module):
    """The loss of one (micro-)batch: CE on a classification slice + alpha * L_simple on a diffusion slice, in ONE
    forward call (what DistributedDataParallel needs: one forward per backward). Returns the loss and its detached
    statistics (loss, ce, diffusion, train accuracy, non-finite flag) as one tensor."""

    def __init__(self, model: ViT, net, diffusion: GaussianDiffusion, alpha: float, label_smoothing: float,
                 joint: bool = False, joint_net=None):
        super().__init__()
        self.model = model                                  # the parameters DDP synchronises
        object.__setattr__(self, "net", net)                # model, or torch.compile(model): not a 2nd submodule
        self.joint_net = joint_net or model.classify_and_denoise     # or its compiled version
        self.diffusion, self.alpha, self.label_smoothing = diffusion, alpha, label_smoothing
        self.joint = joint                                  # HybViT: both batches through one forward pass

    def forward(self, ce_batch, diff_batch):
        zero = torch.zeros((), device=self.model.pos_embed.device)
        loss, ce, diff, acc = zero, zero, zero, zero
        joint_out = x0_cond = y = aug = None
        if diff_batch is not None:
            y = diff_batch[4]                               # class labels (model.class_cond) or None
            aug = diff_batch[6]                             # geometric transforms (data.diffusion_augment) or None
        if diff_batch is not None and diff_batch[5] is not None:
            # Self-conditioning (Chen et al., 2022): for the images marked `keep`, a first pass without gradient
            # gives the x0 estimate the trained pass conditions on; the others get zeros (no estimate yet).
            xt, tt, keep = diff_batch[0], diff_batch[1], diff_batch[5]
            with torch.no_grad():
                first = self.diffusion.x0_from_output(self.net(xt, tt, None, y, aug).float(), xt, tt)
            x0_cond = first * keep.view(-1, *[1] * (xt.dim() - 1)).to(first.dtype)
        if self.joint and ce_batch is not None and diff_batch is not None:
            # One pass over the concatenated batch; the clean rows get zero modulation, which is exactly "no time
            # input" (ViT.classify_and_denoise; equal to two passes, tested). Larger matrix products per launch.
            joint_out = self.joint_net(ce_batch[0], diff_batch[0], diff_batch[1], x0_cond, y, aug)
        if ce_batch is not None:
            x, target, labels = ce_batch
            logits = self.net(x) if joint_out is None else joint_out[0]          # (B, classes)
            ce = F.cross_entropy(logits.float(), target, label_smoothing=self.label_smoothing)
            loss = loss + ce
            acc = (logits.argmax(1) == labels).float().mean()
        if diff_batch is not None:
            xt, tt, x0, noise = diff_batch[:4]
            out = self.net(xt, tt, x0_cond, y, aug) if joint_out is None else joint_out[1]   # (B, C, H, W)
            diff = self.diffusion.output_loss(out, x0, tt, noise)
            loss = loss + (self.alpha if ce_batch is not None else 1.0) * diff
        stats = torch.stack([loss.detach(), ce.detach(), diff.detach(), acc, (~torch.isfinite(loss.detach())).float()])
        return loss, stats


def _shard(tensors: tuple | None, index: int, parts: int) -> tuple | None:
    """Piece `index` of `parts` equal, contiguous pieces of every tensor in a batch tuple (along dim 0)."""
    if tensors is None:
        return None
    return tuple(None if v is None else v[index * (len(v) // parts):(index + 1) * (len(v) // parts)]
                 for v in tensors)


def train(cfg: Config, data: ImageData, out_dir: Path, resume: bool = False, stop_after: int | None = None,
          progress: bool = True) -> dict[str, Any]:
    """Train according to cfg on data, writing the run into out_dir. Returns the metrics written.

    stop_after: stop (with a checkpoint, as Ctrl-C does) once this many steps are done in total; the run can
    then be continued with resume=True.

    Inside a process group (torchrun; see distributed.py) every rank calls this: DistributedDataParallel over the
    ranks, the global batch train.batch_size split between them, and rank 0 alone writing the run (the other ranks
    return {"steps": ..., "rank": ...}).
    """
    cfg.validate()
    t = cfg.train
    out_dir = Path(out_dir)
    ctx = distributed.context()
    device = distributed.device_for(resolve_device(t.device), ctx)
    n_train = len(data.x_train)
    check_batch_split(cfg, n_train, ctx.world)
    amp = distributed.broadcast(ctx, "bf16" if use_bf16(t.amp, device) else "fp32")   # one precision on every rank
    torch.manual_seed(t.seed)
    model = ViT(cfg.model).to(device)
    ema = EMA(model, t.ema_decay, t.ema_warmup) if ctx.main else None    # rank 0 alone keeps (and saves) the EMA
    diffusion = GaussianDiffusion.from_config(cfg.diffusion)
    optimizer = build_optimizer(model, cfg, device, amp)
    total = planned_steps(cfg, n_train)  # None for a wall-clock budget
    start_step, prior_wall, prior_images = 0, 0.0, 0

    last_pt = out_dir / "checkpoints" / "last.pt"
    if resume:
        # Rank 0 reads the checkpoint and hands the other ranks what they need: the run directory need not be
        # visible from every node, and a checkpoint of any number of processes resumes on any other number.
        state = distributed.all_ok(ctx, lambda: ckpt.load_training_state(last_pt), only_main=True)
        shared = distributed.broadcast(ctx, None if not ctx.main else
                                       {k: state[k] for k in ("model", "optimizer", "rng", "step") if k in state}
                                       | {k: state.get(k, 0) for k in ("wall_seconds", "images_seen")})
        model.load_state_dict(ckpt.plain_state_dict(shared["model"]))
        if ema is not None:
            ema.model.load_state_dict(ckpt.plain_state_dict(state["ema"]))
        try:
            optimizer.load_state_dict(shared["optimizer"])
        except (KeyError, ValueError) as e:
            raise HybvitError(f"the checkpoint's optimizer state does not fit train.optimizer={t.optimizer} "
                              f"({type(e).__name__}: {e}); resume with the optimizer the run was trained with") from None
        torch.set_rng_state(shared["rng"]["torch"])
        start_step = int(shared["step"])
        prior_wall = float(shared["wall_seconds"])
        prior_images = int(shared["images_seen"])

    def open_run():
        from torch.utils.tensorboard import SummaryWriter
        out_dir.mkdir(parents=True, exist_ok=True)
        ckpt.write_json(out_dir / "config.json", cfg.to_dict())
        return SummaryWriter(str(out_dir / "tb"))
    writer = distributed.all_ok(ctx, open_run, only_main=True)            # None on the other ranks

    # Small datasets live on the training device as uint8 and are augmented there: a GPU step never waits for
    # CPU workers. Larger ones stay in (pinned) host memory and each batch is copied over.
    resident = device.type == "cpu" or data.x_train.numel() <= cfg.data.device_cache_gb * 2 ** 30
    x_train = data.x_train.to(device) if resident else data.x_train.pin_memory()
    y_train = data.y_train.to(device)

    def fetch(idx: torch.Tensor) -> torch.Tensor:
        return x_train[idx.to(x_train.device)].to(device, non_blocking=True)

    # The batches are global: Batches gives the step's train.batch_size indices whatever the number of processes
    # (the role of a DistributedSampler), and rank r trains on piece r of them. So the data order does not depend
    # on the number of processes, and a run resumed with another number continues the same sequence.
    ce_batches = Batches(n_train, t.batch_size, t.seed, stream=0, repeats=cfg.data.repeated_aug)
    diff_batches = Batches(n_train, t.diff_batch_size, t.seed, stream=1)
    use_ce, use_diff = t.mode in ("vit", "hybvit"), t.mode in ("genvit", "hybvit")
    images_per_step = ce_batches.batch_size * use_ce + diff_batches.batch_size * use_diff   # global, all ranks
    flops_per_step = 3 * model.flops_per_image() * images_per_step  # forward + backward ~ 3x forward
    accum, parts = t.grad_accum, ctx.world * t.grad_accum

    forward_model = torch.compile(model, mode=t.compile_mode) if t.compile else model
    graphs = t.compile and device.type == "cuda" and t.compile_mode == "reduce-overhead"
    joint_model = torch.compile(model.classify_and_denoise, mode=t.compile_mode) if t.compile and t.joint_pass else None
    objective = _Objective(model, forward_model, diffusion, t.alpha, t.label_smoothing, joint=t.joint_pass,
                           joint_net=joint_model)
    if ctx.distributed:
        from torch.nn.parallel import DistributedDataParallel
        # vit never uses the time MLP, genvit never the classifier head: DDP must look for unused parameters
        # there (their gradients stay None on every rank, as in one process); hybvit uses every parameter.
        objective = DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None,
                                            find_unused_parameters=t.mode != "hybvit")

    def diverged(what: str) -> HybvitError:
        """Close the outputs and build the error for a NaN/inf; the last checkpoint on disk stays as it is.
        Every rank sees the same (reduced) losses and weights, so all stop here; rank 0 reports it."""
        if not ctx.main:
            return distributed.CollectiveError(what)
        writer.close()
        if bar is not None:
            bar.close()
        where = f"'{last_pt}'" if last_pt.exists() else "none (no checkpoint was written yet)"
        return HybvitError(f"{what}; stopped, the last good checkpoint is {where}; lower train.lr or use "
                           f"train.grad_clip")

    def save(step: int, images_seen: int, wall: float, total_steps: int) -> None:
        if not bool(torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all()):
            raise diverged(f"weights became non-finite (nan/inf) by step {step}")

        def write() -> None:
            state = {"config": cfg.to_dict(), "step": step, "total_steps": total_steps, "images_seen": images_seen,
                     "wall_seconds": wall, "model": ckpt.plain_state_dict(model),
                     "ema": ckpt.plain_state_dict(ema.model), "optimizer": optimizer.state_dict(),
                     "rng": {"torch": torch.get_rng_state()}, "processes": ctx.world}
            ckpt.save_training_state(last_pt, state)
            ckpt.save_weights(out_dir / "checkpoints" / "ema.safetensors", state["ema"], cfg.to_dict())
        distributed.all_ok(ctx, write, only_main=True)                  # the other ranks wait for rank 0's write

    deadline = time.time() + 60 * t.minutes if t.minutes else None
    calibrated: list = [None, -1]         # (step, time) of the first budget estimate; the step of the re-estimate
    est_total = total if total is not None else 10 ** 9
    bar = _progress_bar(total, start_step, progress and ctx.main)
    t0 = time.time()
    step, images_seen = start_step, prior_images
    run_images = 0
    # Running sums stay on the device (loss, ce, diffusion, train accuracy, non-finite losses) and are read once per
    # check: every step on the CPU (free), every log_every steps on a GPU (each read is a host synchronisation).
    # With several processes each rank sums its own pieces; a check adds them over the ranks first.
    sums = torch.zeros(5, device=device, dtype=torch.float64)
    n_summed = 0
    check_every = 1 if device.type == "cpu" else t.log_every
    model.train()
    with _StopFlag() as stop:
        while step < est_total:
            lr = lr_at(step, est_total, warmup_steps(cfg, n_train, est_total), t.lr, t.min_lr, t.lr_schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # Every rank builds the inputs of the WHOLE global batch from the step's generator, exactly as one
            # process does, and keeps its own piece; so K processes (and grad_accum micro-batches) compute the
            # gradient of the same batch as one process, augmentation choices, CutMix/Mixup partners (drawn from
            # the global batch), timesteps and noise included. The price is that each rank augments and noises
            # the global batch (input preparation, not network work): augment.py draws the per-image choices and
            # applies them in one pass, so the draws cannot be made for the global batch and applied to a piece.
            g = step_generator(t.seed, step, 0)
            ce_inputs = diff_inputs = None
            if use_ce:
                idx = ce_batches.indices(step).to(device)
                x, target = classifier_batch(fetch(idx), y_train[idx], cfg.model.num_classes, cfg.data, g)
                ce_inputs = (x, target, y_train[idx])
            if use_diff:
                idx = diff_batches.indices(step).to(device)
                x0 = to_float(fetch(idx))                                    # never augmented ...
                if cfg.data.diffusion_hflip:                                   # ... unless asked for flips
                    x0 = augment(x0, 0, True, g)
                aug = None
                if cfg.data.diffusion_augment > 0:         # non-leaking: the denoiser is told each transform
                    x0, aug = diffusion_geometric(x0, cfg.data.diffusion_augment, g)
                xt, tt, noise = diffusion.noised(x0, generator=g)             # t ~ U{0..T-1}, eps ~ N(0, I)
                y = keep = None
                if cfg.model.class_cond:                 # the labels, "no label" (num_classes) for a dropout share
                    drop = torch.rand(len(x0), generator=g, device="cpu") < t.label_dropout
                    y = torch.where(drop.to(device), cfg.model.num_classes, y_train[idx])
                if cfg.model.self_cond:                  # which images condition on a first-pass x0 estimate
                    keep = torch.rand(len(x0), generator=g, device="cpu").lt(t.self_cond_prob).to(device)
                diff_inputs = (xt, tt, x0, noise, y, keep, aug)
            optimizer.zero_grad(set_to_none=True)
            for m in range(accum):
                piece = ctx.rank * accum + m          # rank r owns pieces r*A .. r*A + A-1 of the global batch
                last = m == accum - 1                 # DDP averages the gradients over the ranks after the last
                with (objective.no_sync() if ctx.distributed and not last else contextlib.nullcontext()):
                    if graphs:                        # CUDA graphs: each micro-batch is a new replay
                        torch.compiler.cudagraph_mark_step_begin()
                    with autocast(amp, device):
                        loss, stats = objective(_shard(ce_inputs, piece, parts), _shard(diff_inputs, piece, parts))
                    # mean over the local piece, / A here, averaged over K ranks by DDP: the global batch mean
                    (loss / accum if accum > 1 else loss).backward()
                sums += stats / accum if accum > 1 else stats
            if t.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            optimizer.step()
            if ema is not None:
                ema.update(model, step)
            step += 1
            images_seen += images_per_step
            run_images += images_per_step
            n_summed += 1

            elapsed = time.time() - t0
            # A wall-clock budget: estimate the total steps (the LR schedule needs it) after 10 steps, then once more
            # at 10 % of the budget from the rate since step 10, when start-up costs no longer distort it.
            if deadline is not None and ((step - start_step == 10 and total is None) or step == calibrated[1]):
                now = time.time()
                if calibrated[0] is None:
                    per_step = elapsed / 10
                else:
                    per_step = (now - calibrated[0][1]) / (step - calibrated[0][0])
                est = step + max(1, int((deadline - now) / per_step))
                est_total = total = int(distributed.agree(ctx, [est], "min")[0])   # all ranks stop together
                if calibrated[0] is None:                   # re-estimate at ~10 % of the run (a step every rank
                    calibrated = [(step, now), step + max(5, (est_total - step) // 10)]   # reaches together)
                if bar is not None:
                    bar.total = est_total
                    bar.refresh()
            # Ctrl-C / SIGTERM (on any rank) and the deadline. With several processes they are agreed over the CPU
            # control group at each check (every step on the CPU, every log_every steps on GPUs: ~0.1-0.6 ms each),
            # so all ranks stop after the same step, whichever of them got the signal.
            stop_now, past_deadline = stop.stop, deadline is not None and time.time() >= deadline
            if ctx.distributed:
                if step % check_every == 0:
                    stop_now, past_deadline = (bool(v) for v in distributed.agree(ctx, [stop_now, past_deadline]))
                else:
                    stop_now = past_deadline = False
            if past_deadline:
                est_total = step
            log_now = step % t.log_every == 0 or step == est_total
            if log_now or step % check_every == 0:
                host = distributed.sum_over_ranks(ctx, sums).tolist()
                if host[4] > 0:
                    raise diverged(f"loss became non-finite (nan/inf) {'at' if check_every == 1 else 'by'} "
                                   f"step {step}")
                if log_now:
                    n = n_summed * ctx.world
                    stats = dict(zip(("loss", "ce", "diff", "acc"), host[:4], strict=True))
                    ips = run_images / max(elapsed, 1e-9)
                    if writer is not None:
                        scalars = {"loss/total": stats["loss"] / n, "lr": lr, "speed/images_per_s": ips,
                                   "speed/gflops_per_s": flops_per_step * (step - start_step) / max(elapsed, 1e-9)
                                   / 1e9}
                        if use_ce:
                            scalars["loss/ce"], scalars["train/accuracy"] = stats["ce"] / n, stats["acc"] / n
                        if use_diff:
                            scalars["loss/diffusion"] = stats["diff"] / n
                        for k, v in scalars.items():
                            writer.add_scalar(k, v, step)
                    if bar is not None:
                        post = {"loss": f"{stats['loss'] / n:.4f}"}
                        if use_ce:
                            post.update(ce=f"{stats['ce'] / n:.3f}", acc=f"{stats['acc'] / n:.3f}")
                        if use_diff:
                            post["diff"] = f"{stats['diff'] / n:.4f}"
                        post["img/s"] = f"{ips:.0f}"
                        bar.set_postfix(post, refresh=False)
                    sums.zero_()
                    n_summed = 0
            if bar is not None:
                bar.update(1)
            if t.sample_every and step % t.sample_every == 0 and use_diff:
                distributed.all_ok(ctx, lambda s=step: _log_samples(writer, ema.model, diffusion, cfg, device, s,
                                                                    n=min(64, t.num_samples), amp=amp), only_main=True)
            interrupted = stop_now or (stop_after is not None and step >= stop_after)
            if step % t.ckpt_every == 0 or interrupted:
                save(step, images_seen, prior_wall + time.time() - t0, est_total)
            if interrupted:
                if ctx.main:
                    if bar is not None:
                        bar.close()
                    writer.close()
                    print(f"stopped at step {step}; checkpoint written to {last_pt}; continue with "
                          f"`hybvit train --resume {out_dir}`" + (" (any number of processes)" if ctx.distributed
                                                                   else ""))
                return {"steps": step, "interrupted": True}
    if bar is not None:
        bar.close()
    train_seconds = time.time() - t0
    save(step, images_seen, prior_wall + train_seconds, step)

    def finish_run() -> dict[str, Any]:                      # rank 0; the other ranks wait in all_ok
        metrics = finish(cfg, data, model, ema.model, diffusion, out_dir, writer, device, amp)
        metrics.update(steps=step, images_seen=images_seen, wall_seconds=round(prior_wall + time.time() - t0, 2),
                       train_seconds=round(prior_wall + train_seconds, 2),
                       images_per_second=round(run_images / max(train_seconds, 1e-9), 1),
                       train_gflops_per_second=round(flops_per_step * (step - start_step)
                                                     / max(train_seconds, 1e-9) / 1e9, 2),
                       params=model.num_params(), mode=t.mode, preset=cfg.preset, data=cfg.data.spec,
                       device=str(device), amp=amp,
                       processes=ctx.world, grad_accum=t.grad_accum)
        ckpt.write_json(out_dir / "metrics.json", metrics)
        writer.close()
        return metrics
    metrics = distributed.all_ok(ctx, finish_run, only_main=True)
    return metrics if ctx.main else {"steps": step, "rank": ctx.rank}


def _progress_bar(total: int | None, start: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, mininterval=1.0)


@torch.no_grad()
def _log_samples(writer, model: ViT, diffusion: GaussianDiffusion, cfg: Config, device, step: int, n: int,
                 amp: str):
    from .sample import draw_samples, make_grid
    x = draw_samples(model, diffusion, n, sampler=cfg.train.sampler, steps=cfg.train.sample_steps,
                     seed=cfg.train.seed, device=device, amp=amp, eps_scale=cfg.train.eps_scale)
    writer.add_image("samples", make_grid(x).permute(2, 0, 1), step)


def finish(cfg: Config, data: ImageData, model: ViT, ema_model: ViT, diffusion: GaussianDiffusion, out_dir: Path,
           writer, device, amp: str) -> dict[str, Any]:
    """End-of-run evaluation: test accuracy (EMA and raw weights), samples.png and the optional pixel-FD."""
    from .sample import draw_samples, make_grid, save_png
    t = cfg.train
    metrics: dict[str, Any] = {}
    if t.mode in ("vit", "hybvit"):
        metrics["test_accuracy"] = accuracy(ema_model, data.x_test, data.y_test, t.eval_batch_size, amp)
        metrics["test_accuracy_raw"] = accuracy(model, data.x_test, data.y_test, t.eval_batch_size, amp)
        writer.add_scalar("test/accuracy", metrics["test_accuracy"], 0)
        print(f"test accuracy: {metrics['test_accuracy']:.4f} (EMA), {metrics['test_accuracy_raw']:.4f} (raw)")
    n = max(t.num_samples, t.fd_samples)
    if t.mode in ("genvit", "hybvit") and n > 0:                      # num_samples = fd_samples = 0: no sampling
        t0 = time.time()
        x = draw_samples(ema_model, diffusion, n, sampler=t.sampler, steps=t.sample_steps, seed=t.seed,
                         device=device, amp=amp, batch_size=t.eval_batch_size, eps_scale=t.eps_scale)
        metrics["sampling_images_per_second"] = round(n / (time.time() - t0), 1)
        if t.num_samples:
            grid = make_grid(x[:t.num_samples])
            save_png(out_dir / "samples.png", grid)
            writer.add_image("samples", grid.permute(2, 0, 1), 0)
        if t.fd_samples:
            from .evaluate.frechet import pixel_frechet_distance
            fd = pixel_frechet_distance(x[:t.fd_samples], data.x_test)
            metrics["pixel_fd"] = round(fd, 4)
            metrics["pixel_fd_samples"] = t.fd_samples
            metrics["pixel_fd_sampler"] = f"{t.sampler}-{t.sample_steps}" if t.sampler == "ddim" else "ancestral"
            if t.eps_scale != 1.0:
                metrics["pixel_fd_eps_scale"] = t.eps_scale
            print(f"pixel-space Frechet distance ({t.fd_samples} samples vs test set): {fd:.3f}")
    return metrics
