"""The HybViT objective of one training step: the step's global batches, drawn from its seeded generator, and
the loss of a (micro-)batch, CE on clean images + alpha * L_simple on noised ones (paper Eq. 23)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .augment import classifier_batch, diffusion_geometric
from .config import Config
from .data import Batches, step_generator, to_float
from .diffusion import GaussianDiffusion
from .model import ViT

LABEL_DROPOUT = 0.1        # model.class_cond: a tenth of the diffusion images train "no label" (as DiT)


def batch_inputs(cfg: Config, step: int, x_train: torch.Tensor, y_train: torch.Tensor, device: torch.device,
                 ce_batches: Batches | None, diff_batches: Batches | None,
                 diffusion: GaussianDiffusion) -> tuple[tuple | None, tuple | None]:
    """The step's global batches: (x, target, labels) for CE and (x_t, t, x0, eps, y, aug) for the diffusion.

    Every rank builds the inputs of the WHOLE global batch from the step's generator, exactly as one process does,
    and keeps its own piece; so K processes (and grad_accum micro-batches) compute the gradient of the same batch
    as one process, augmentation choices, CutMix/Mixup partners, timesteps and noise included. x_train (uint8) may
    live on another device than `device` (pinned host memory for large datasets)."""
    g = step_generator(cfg.train.seed, step, 0)

    def fetch(idx: torch.Tensor) -> torch.Tensor:
        return x_train[idx.to(x_train.device)].to(device, non_blocking=True)

    ce_inputs = diff_inputs = None
    if ce_batches is not None:
        idx = ce_batches.indices(step).to(device)
        x, target = classifier_batch(fetch(idx), y_train[idx], cfg.model.num_classes, cfg.data, g)
        ce_inputs = (x, target, y_train[idx])
    if diff_batches is not None:
        idx = diff_batches.indices(step).to(device)
        x0 = to_float(fetch(idx))                                   # never augmented, unless ...
        aug = None
        if cfg.data.diffusion_augment > 0:                          # ... non-leaking: the denoiser is told each transform
            x0, aug = diffusion_geometric(x0, cfg.data.diffusion_augment, g)
        xt, tt, noise = diffusion.noised(x0, generator=g)        # t ~ U{0..T-1}, eps ~ N(0, I)
        y = None
        if cfg.model.class_cond:                   # the labels, "no label" (num_classes) for a dropout share
            drop = torch.rand(len(x0), generator=g, device="cpu") < LABEL_DROPOUT
            y = torch.where(drop.to(device), cfg.model.num_classes, y_train[idx])
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
