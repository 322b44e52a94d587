"""The HybViT objective of one training step: the step's global batches, drawn from its seeded generator, and
the loss of a (micro-)batch, CE on clean images + alpha * L_simple on noised ones (paper Eq. 23)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .augment import apply_classifier, apply_geometric, draw_classifier, draw_geometric, needed_rows
from .config import Config
from .data import Batches, step_generator, to_float
from .diffusion import GaussianDiffusion
from .model import ViT

LABEL_DROPOUT = 0.1        # model.class_cond: a tenth of the diffusion images train "no label" (as DiT)


def share_rows(n: int, share: tuple[int, int]) -> torch.Tensor:
    """The rows of a global batch of n that process `rank` of `world` keeps: the rank-th of world equal,
    contiguous pieces (n // world rows)."""
    rank, world = share
    return torch.arange(rank * (n // world), (rank + 1) * (n // world))


def batch_inputs(cfg: Config, step: int, x_train: torch.Tensor, y_train: torch.Tensor, device: torch.device,
                 ce_batches: Batches | None, diff_batches: Batches | None, diffusion: GaussianDiffusion,
                 share: tuple[int, int] = (0, 1)) -> tuple[tuple | None, tuple | None]:
    """This process's share of the step's global batches: (x, target, labels) for CE and (x_t, t, x0, eps, y, aug)
    for the diffusion, the rows share_rows(B, share) of each.

    Every process draws every random choice of the WHOLE global batch from the step's generator (indices, crops,
    flips, policies, erasing boxes, mix partners and lambda, transforms, timesteps, noise, label dropout), exactly as
    one process does, but fetches and augments only the images of its own rows (and, in a mixed batch, their
    partners'); so K processes (and grad_accum micro-batches) compute the gradient of the same batch as one
    process, and the shares of K processes concatenated are bitwise the one-process batch (on a CPU). x_train (uint8) may live
    on another device than `device` (pinned host memory for large datasets)."""
    g = step_generator(cfg.train.seed, step, 0)
    shape = tuple(x_train.shape[1:])

    def fetch(idx: torch.Tensor) -> torch.Tensor:
        return x_train[idx.to(x_train.device)].to(device, non_blocking=True)

    def labels(idx: torch.Tensor) -> torch.Tensor:
        return y_train[idx.to(y_train.device)].to(device)

    ce_inputs = diff_inputs = None
    if ce_batches is not None:
        idx = ce_batches.indices(step)                                          # (B,)
        rows = share_rows(len(idx), share)
        draw = draw_classifier(len(idx), shape, cfg.data, g)
        need = needed_rows(draw, rows)                          # own rows, and their mix partners
        y = labels(idx)
        x, target = apply_classifier(draw, fetch(idx[need]), need, y, rows, cfg.model.num_classes)
        ce_inputs = (x, target, y[rows.to(device)])
    if diff_batches is not None:
        idx = diff_batches.indices(step)
        B, rows = len(idx), share_rows(len(idx), share)
        x0 = to_float(fetch(idx[rows]))                               # never augmented, unless ...
        aug = None
        if cfg.data.diffusion_augment > 0:                          # ... non-leaking: the denoiser is told each transform
            index = draw_geometric(B, cfg.data.diffusion_augment, g)[rows]
            x0, aug = apply_geometric(x0, index), index.to(device)
        t, noise = diffusion.draw(B, shape, g)                     # t ~ U{0..T-1}, eps ~ N(0, I)
        tt, noise = t[rows].to(device), noise[rows].to(device, x0.dtype)
        xt = diffusion.q_sample(x0, tt, noise)
        y = None
        if cfg.model.class_cond:                   # the labels, "no label" (num_classes) for a dropout share
            drop = (torch.rand(B, generator=g, device="cpu") < LABEL_DROPOUT)[rows]
            y = torch.where(drop.to(device), cfg.model.num_classes, labels(idx[rows]))
        diff_inputs = (xt, tt, x0, noise, y, aug)
    return ce_inputs, diff_inputs


class Objective(torch.nn.Module):
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
        joint_out = None
        if self.joint and ce_batch is not None and diff_batch is not None:
            # One pass over the concatenated batch; the clean rows get zero modulation, which is exactly "no time
            # input" (ViT.classify_and_denoise; equal to two passes, tested). Larger matrix products per launch.
            xt, tt, _, _, y, aug = diff_batch
            joint_out = self.joint_net(ce_batch[0], xt, tt, y, aug)
        if ce_batch is not None:
            x, target, labels = ce_batch
            logits = self.net(x) if joint_out is None else joint_out[0]          # (B, classes)
            ce = F.cross_entropy(logits.float(), target, label_smoothing=self.label_smoothing)
            loss = loss + ce
            acc = (logits.argmax(1) == labels).float().mean()
        if diff_batch is not None:
            xt, tt, x0, noise, y, aug = diff_batch
            out = self.net(xt, tt, y, aug) if joint_out is None else joint_out[1]   # (B, C, H, W)
            diff = self.diffusion.output_loss(out, x0, tt, noise)
            loss = loss + (self.alpha if ce_batch is not None else 1.0) * diff
        stats = torch.stack([loss.detach(), ce.detach(), diff.detach(), acc, (~torch.isfinite(loss.detach())).float()])
        return loss, stats


def shard(tensors: tuple | None, index: int, parts: int) -> tuple | None:
    """Piece `index` of `parts` equal, contiguous pieces of every tensor in a batch tuple (along dim 0)."""
    if tensors is None:
        return None
    return tuple(None if v is None else v[index * (len(v) // parts):(index + 1) * (len(v) // parts)]
                 for v in tensors)
