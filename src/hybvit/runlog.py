"""What a training run reports while it runs: the running loss sums, the progress bar, and the scalars (rank 0)
for TensorBoard and log.jsonl, one JSON object per logged step ({"step": 10, "loss/total": ..., ...}), which needs
no TensorBoard to read. A non-finite loss stops the run here."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from . import distributed
from .errors import HybvitError


class Logger:
    """Running loss sums (kept on the device, read once per check: every step on the CPU, every log_every steps on
    a GPU, as each read is a host synchronisation), the progress bar, and the scalars (rank 0): TensorBoard and
    log.jsonl. `tr` is the run's train.Trainer."""

    def __init__(self, tr, writer, total: int | None, progress: bool, jsonl: Path | None = None,
                 log_every: int = 10):
        self.tr, self.writer = tr, writer
        self.jsonl = open(jsonl, "a") if jsonl is not None and writer is not None else None
        self.sums = torch.zeros(5, device=tr.device, dtype=torch.float64)
        self.n_summed, self.run_images = 0, 0
        self.check_every = 1 if tr.device.type == "cpu" else log_every
        self.flops_per_step = 3 * tr.model.flops_per_image() * tr.images_per_step  # forward + backward ~ 3x
        self.bar = (tqdm(total=total, initial=tr.start_step, unit="step", dynamic_ncols=True, mininterval=1.0)
                    if progress and tr.ctx.main else None)

    def add(self, stats: torch.Tensor) -> None:
        self.sums += stats
        self.n_summed += 1
        self.run_images += self.tr.images_per_step

    def set_total(self, total: int) -> None:
        if self.bar is not None:
            self.bar.total = total
            self.bar.refresh()

    def check(self, step: int, lr: float, elapsed: float, log_now: bool, last_pt: Path) -> None:
        """Stop on a non-finite loss; on log steps write the mean losses, LR and speed."""
        if not (log_now or step % self.check_every == 0):
            return
        host = distributed.sum_over_ranks(self.tr.ctx, self.sums).tolist()
        if host[4] > 0:
            raise self.diverged(f"loss became non-finite (nan/inf) {'at' if self.check_every == 1 else 'by'} "
                                f"step {step}", last_pt)
        if not log_now:
            return
        n = self.n_summed * self.tr.ctx.world
        loss, ce, diff, acc = (v / n for v in host[:4])
        mode = self.tr.cfg.train.mode
        ips = self.run_images / max(elapsed, 1e-9)
        if self.writer is not None:
            scalars = {"loss/total": loss, "lr": lr, "speed/images_per_s": ips,
                       "speed/gflops_per_s": self.flops_per_step * (step - self.tr.start_step) / max(elapsed, 1e-9)
                       / 1e9}
            if mode != "genvit":
                scalars["loss/ce"], scalars["train/accuracy"] = ce, acc
            if mode != "vit":
                scalars["loss/diffusion"] = diff
            self.scalars(scalars, step)
        if self.bar is not None:
            post = {"loss": f"{loss:.4f}"}
            if mode != "genvit":
                post.update(ce=f"{ce:.3f}", acc=f"{acc:.3f}")
            if mode != "vit":
                post["diff"] = f"{diff:.4f}"
            post["img/s"] = f"{ips:.0f}"
            self.bar.set_postfix(post, refresh=False)
        self.sums.zero_()
        self.n_summed = 0

    def scalars(self, values: dict[str, float], step: int) -> None:
        """Log scalars of one step to TensorBoard and log.jsonl (rank 0; nothing on the other ranks)."""
        if self.writer is None:
            return
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)
        if self.jsonl is not None:
            self.jsonl.write(json.dumps({"step": step, **{k: float(v) for k, v in values.items()}}) + "\n")
            self.jsonl.flush()

    def write(self, line: str) -> None:
        """A line of text above the progress bar (rank 0)."""
        if self.tr.ctx.main:
            (self.bar.write if self.bar is not None else print)(line)

    def diverged(self, what: str, last_pt: Path) -> HybvitError:
        """Close the outputs and build the error for a NaN/inf; the last checkpoint on disk stays as it is.
        Every rank sees the same (reduced) losses and weights, so all stop here; rank 0 reports it."""
        if not self.tr.ctx.main:
            return distributed.CollectiveError(what)
        self.close()
        where = f"'{last_pt}'" if last_pt.exists() else "none (no checkpoint was written yet)"
        return HybvitError(f"{what}; stopped, the last good checkpoint is {where}; lower train.lr or use "
                           f"train.grad_clip")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.writer is not None:
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()
            self.jsonl = None


def trim_log(path: Path, step: int) -> None:
    """Keep the lines of log.jsonl up to `step`: a resumed run logs the steps after its checkpoint again."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if int(json.loads(line)["step"]) <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            pass                                      # a line a kill cut short
    ckpt.atomic_write(path, lambda tmp: Path(tmp).write_text("".join(k + "\n" for k in keep)))
