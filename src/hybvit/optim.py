"""Optimisers, the learning-rate schedule and the EMA of the weights.

  build_optimizer(model, cfg, device, amp)   AdamW (the paper's code) | SGD (the paper's text) | Muon + AdamW
  lr_at(step, total, warmup, lr, min_lr)     linear warm-up, then cosine decay to min_lr (the paper's code)
  EMA(model, decay).update(model, step)      ema <- d * ema + (1 - d) * model
"""
from __future__ import annotations

import copy
import math

import torch

from .config import Config
from .errors import HybvitError


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


def lr_at(step: int, total: int, warmup: int, lr: float, min_lr: float) -> float:
    """Linear warm-up from ~0 over `warmup` steps, then cosine decay to min_lr at `total` (the paper's code)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, cfg: Config, device: torch.device,
                    amp: str = "fp32") -> torch.optim.Optimizer:
    """amp is the resolved precision ("bf16" or "fp32"); Muon's Newton-Schulz iteration runs in it."""
    t = cfg.train
    # AdamW and SGD decay every parameter, as the paper's code (norms, biases, positional embedding and CLS too)
    groups = [{"params": list(model.parameters()), "weight_decay": t.weight_decay}]
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=t.lr, momentum=0.9, nesterov=True)          # Nesterov 0.9: the paper's text
    extra = {"fused": True} if device.type == "cuda" else {}
    if t.optimizer == "muon":
        return MuonAdamW(model, t, extra, torch.bfloat16 if amp == "bf16" else torch.float32)
    return torch.optim.AdamW(groups, lr=t.lr, **extra)


def _decay_groups(named: list[tuple[str, torch.Tensor]], weight_decay: float) -> list[dict]:
    """Muon's AdamW part (beyond the paper, as Muon's authors): weight decay on the matrices, none on biases, norms,
    the positional embedding and the CLS token."""
    decays = lambda n, p: p.ndim >= 2 and "pos_embed" not in n and "cls_token" not in n   # noqa: E731
    return [{"params": [p for n, p in named if decays(n, p)], "weight_decay": weight_decay},
            {"params": [p for n, p in named if not decays(n, p)], "weight_decay": 0.0}]


# ----------------------------------------------------------------------------- Muon

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
    CPU whose bf16 matmuls are slower than fp32 that made Muon 19 % of the digits-hybvit-plus step (docs/speed.md)."""

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
        self.adamw = torch.optim.AdamW(_decay_groups(rest, t.weight_decay), lr=t.lr, **extra)

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
