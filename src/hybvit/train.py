"""Training for the three modes (ViT, GenViT, HybViT), readable top to bottom.

  vit     L = CE(classify(aug(x)), y)
  genvit  L = L_simple(x0)                                       (Eq. 15, L1 by default as the paper's code)
  hybvit  L = CE(classify(aug(x)), y) + alpha * L_simple(x0')    (Eq. 23; x and x0' are independent batches,
                                                                  the diffusion batch is never augmented)

AdamW (lr 1e-3, wd 0.05), linear warm-up then cosine decay per iteration, gradient clipping 1.0, EMA 0.999:
what the paper's code ran. Batches, noise and timesteps come from generators seeded by (seed, step), so a
run resumed from any checkpoint ends with exactly the weights of one that was never interrupted (on the CPU).

The pieces, in the order train() uses them: setup (model, EMA, optimizer, resume), batch_inputs and train_step
(one optimizer step), Budget (the wall-clock budget), Logger (progress bar, TensorBoard, the divergence check)
and save_checkpoint.
"""
from __future__ import annotations

import contextlib
import json
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from . import distributed
from .config import Config, parse_every
from .data import Batches, ImageData
from .diffusion import GaussianDiffusion
from .errors import HybvitError
from .evaluate.end_of_run import PeriodicEval, finish, log_samples
from .init_from import load_into
from .model import ViT
from .objective import Objective, batch_inputs, shard
from .optim import EMA, build_optimizer, lr_at
from .precision import autocast, enable_tf32, grad_scaler, resolve_amp, resolve_device
from .provenance import provenance
from .sample import check_weights_fit
from .threads import ThreadGovernor


# ----------------------------------------------------------------------------- the budget in steps

def steps_per_epoch(cfg: Config, n_train: int) -> int:
    return max(1, (cfg.data.epoch_repeats * n_train) // min(cfg.train.batch_size, n_train))


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


def decide_recipe(tr: "Trainer", total: int, n_train: int) -> str | None:
    """train.recipe_min_epochs > 0: keep the classification recipe (random crop, label smoothing) only if the run
    sees its data at least that many times; on shorter runs it costs accuracy (docs/results/own-data.md). Decided
    once, when the run's length in steps is first known (up front, or at the first estimate of a wall-clock budget),
    and recorded in the config (recipe_min_epochs becomes 0), so a resumed run keeps the decision. Returns the note,
    or None when there is nothing to decide."""
    cfg, t = tr.cfg, tr.cfg.train
    if t.recipe_min_epochs <= 0 or tr.ce_batches is None:
        return None
    epochs = total / steps_per_epoch(cfg, n_train)
    keep = epochs >= t.recipe_min_epochs
    if not keep:
        cfg.data.crop_padding, t.label_smoothing = 0, 0.0
        getattr(tr.objective, "module", tr.objective).label_smoothing = 0.0        # DDP wraps the objective
    note = (f"classification recipe {'kept' if keep else 'off'}: the run sees its data {epochs:.0f} "
            f"time{'' if round(epochs) == 1 else 's'}, "
            f"{'at least' if keep else 'fewer than'} train.recipe_min_epochs={t.recipe_min_epochs:g}")
    t.recipe_min_epochs = 0.0
    cfg.notes = [*cfg.notes, note]
    return note


def warmup_steps(cfg: Config, n_train: int, total: int) -> int:
    w = cfg.train.warmup_epochs * steps_per_epoch(cfg, n_train)
    return max(1, int(min(w, cfg.train.warmup_max_frac * total)))


def check_batch_split(cfg: Config, n_train: int, world: int = 1) -> None:
    """train.batch_size is the global batch of each branch; it must split evenly into world processes x
    train.grad_accum micro-batches (after the cap at the training-set size that Batches applies)."""
    t = cfg.train
    parts = world * t.grad_accum
    b = Batches(n_train, t.batch_size, t.seed, 0).batch_size
    if b % parts:
        capped = "" if b == t.batch_size else f" (train.batch_size {t.batch_size} capped at the training set)"
        raise HybvitError(f"the global batch of {b} images{capped} does not split into {world} process(es) x "
                          f"train.grad_accum {t.grad_accum}; use a multiple of {parts}, e.g. "
                          f"--set train.batch_size={max(parts, round(b / parts) * parts)}")


# ----------------------------------------------------------------------------- setup

@dataclass
class Trainer:
    """Everything one training run holds: built by setup(), used by train_step() and train()."""
    cfg: Config
    ctx: distributed.Context
    device: torch.device
    amp: str                               # the precision that runs: "bf16", "fp16" or "fp32"
    model: ViT
    ema: EMA | None                        # rank 0 alone keeps (and saves) the EMA
    optimizer: Any
    diffusion: GaussianDiffusion
    objective: torch.nn.Module             # Objective, wrapped in DistributedDataParallel under torchrun
    x_train: torch.Tensor
    y_train: torch.Tensor
    ce_batches: Batches | None
    diff_batches: Batches | None
    graphs: bool                           # CUDA graphs (compile_mode reduce-overhead): mark each replay
    scaler: Any = None                     # the gradient scaler of fp16 training (precision.grad_scaler)
    start_step: int = 0
    prior_wall: float = 0.0
    prior_images: int = 0

    @property
    def images_per_step(self) -> int:      # global, all ranks
        return sum(b.batch_size for b in (self.ce_batches, self.diff_batches) if b is not None)


def setup(cfg: Config, data: ImageData, resume_from: Path | None = None,
          init: dict[str, torch.Tensor] | None = None) -> Trainer:
    """Build the model, EMA, optimizer and loss on this process's device; start from the weights `init` (train
    --init-from; under torchrun rank 0's, which DDP hands to the others), or load the checkpoint when resuming."""
    t = cfg.train
    ctx = distributed.context()
    device = distributed.device_for(resolve_device(t.device), ctx)
    check_batch_split(cfg, len(data.x_train), ctx.world)
    amp = distributed.broadcast(ctx, resolve_amp(t.amp, device))        # one precision on every rank
    enable_tf32(device)                                                  # fp32 matmuls in TF32 where GPUs have it
    torch.manual_seed(t.seed)
    model = ViT(cfg.model)
    if init is not None:
        load_into(model, init)
    model = model.to(device)
    ema = EMA(model, t.ema_decay, t.ema_warmup) if ctx.main else None
    diffusion = GaussianDiffusion.from_config(cfg.diffusion)
    optimizer = build_optimizer(model, cfg, device, amp)

    net = torch.compile(model, mode=t.compile_mode) if t.compile else model
    joint_net = torch.compile(model.classify_and_denoise, mode=t.compile_mode) if t.compile and t.joint_pass else None
    objective = Objective(model, net, diffusion, t.alpha, t.label_smoothing, joint=t.joint_pass, joint_net=joint_net)
    if ctx.distributed:
        # vit never uses the time MLP, genvit never the classifier head: DDP must look for unused parameters
        # there (their gradients stay None on every rank, as in one process); hybvit uses every parameter.
        objective = DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None,
                                            find_unused_parameters=t.mode != "hybvit")

    # Small datasets live on the training device as uint8 and are augmented there: a GPU step never waits for
    # CPU workers. Larger ones stay in (pinned) host memory and each batch is copied over.
    resident = device.type == "cpu" or data.x_train.numel() <= cfg.data.device_cache_gb * 2 ** 30
    # The batches are global: Batches gives the step's train.batch_size indices whatever the number of processes
    # (the role of a DistributedSampler), and rank r trains on piece r of them. So the data order does not depend
    # on the number of processes, and a run resumed with another number continues the same sequence.
    n = len(data.x_train)
    tr = Trainer(cfg, ctx, device, amp, model, ema, optimizer, diffusion, objective,
                 x_train=data.x_train.to(device) if resident else data.x_train.pin_memory(),
                 y_train=data.y_train.to(device),
                 ce_batches=Batches(n, t.batch_size, t.seed, stream=0) if t.mode != "genvit" else None,
                 diff_batches=Batches(n, t.batch_size, t.seed, stream=1) if t.mode != "vit" else None,
                 graphs=t.compile and device.type == "cuda" and t.compile_mode == "reduce-overhead",
                 scaler=grad_scaler(amp, device))
    if resume_from is not None:
        _load(tr, resume_from)
    return tr


def _load(tr: Trainer, last_pt: Path) -> None:
    """Continue from a checkpoint. Rank 0 reads it and hands the other ranks what they need: the run directory
    need not be visible from every node, and a checkpoint of any number of processes resumes on any other."""
    ctx = tr.ctx
    state = distributed.all_ok(ctx, lambda: ckpt.load_training_state(last_pt), only_main=True)
    shared = distributed.broadcast(ctx, None if not ctx.main else
                                   {k: state[k] for k in ("model", "optimizer", "rng", "step", "scaler") if k in state}
                                   | {k: state.get(k, 0) for k in ("wall_seconds", "images_seen")})
    check_weights_fit(tr.cfg, ckpt.plain_state_dict(shared["model"]), last_pt)
    tr.model.load_state_dict(ckpt.plain_state_dict(shared["model"]))
    if tr.ema is not None:
        check_weights_fit(tr.cfg, ckpt.plain_state_dict(state["ema"]), last_pt)
        tr.ema.model.load_state_dict(ckpt.plain_state_dict(state["ema"]))
    try:
        tr.optimizer.load_state_dict(shared["optimizer"])
    except (KeyError, ValueError) as e:
        raise HybvitError(f"the checkpoint's optimizer state does not fit train.optimizer={tr.cfg.train.optimizer} "
                          f"({type(e).__name__}: {e}); resume with the optimizer the run was trained with") from None
    if tr.scaler is not None and isinstance(shared.get("scaler"), dict):
        tr.scaler.load_state_dict(shared["scaler"])
    torch.set_rng_state(shared["rng"]["torch"])
    tr.start_step = int(shared["step"])
    tr.prior_wall = float(shared["wall_seconds"])
    tr.prior_images = int(shared["images_seen"])


# ----------------------------------------------------------------------------- one step

def train_step(tr: Trainer, step: int, lr: float) -> torch.Tensor:
    """One optimizer step on the step's global batch; returns this rank's loss statistics (see Objective)."""
    t, ctx = tr.cfg.train, tr.ctx
    for group in tr.optimizer.param_groups:
        group["lr"] = lr
    ce_inputs, diff_inputs = batch_inputs(tr.cfg, step, tr.x_train, tr.y_train, tr.device, tr.ce_batches,
                                         tr.diff_batches, tr.diffusion)
    accum, parts = t.grad_accum, ctx.world * t.grad_accum
    tr.optimizer.zero_grad(set_to_none=True)
    stats = 0
    for m in range(accum):
        piece = ctx.rank * accum + m          # rank r owns pieces r*A .. r*A + A-1 of the global batch
        last = m == accum - 1                 # DDP averages the gradients over the ranks after the last
        with (tr.objective.no_sync() if ctx.distributed and not last else contextlib.nullcontext()):
            if tr.graphs:                     # CUDA graphs: each micro-batch is a new replay
                torch.compiler.cudagraph_mark_step_begin()
            with autocast(tr.amp, tr.device):
                loss, s = tr.objective(shard(ce_inputs, piece, parts), shard(diff_inputs, piece, parts))
            # mean over the local piece, / A here, averaged over K ranks by DDP: the global batch mean
            loss = loss / accum if accum > 1 else loss
            (tr.scaler.scale(loss) if tr.scaler is not None else loss).backward()
        stats = stats + (s / accum if accum > 1 else s)
    if tr.scaler is not None:                 # fp16: true gradients for the clip; a step with inf/nan is skipped
        tr.scaler.unscale_(tr.optimizer)
    if t.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(tr.model.parameters(), t.grad_clip)
    if tr.scaler is not None:
        tr.scaler.step(tr.optimizer)
        tr.scaler.update()
    else:
        tr.optimizer.step()
    if tr.ema is not None:
        tr.ema.update(tr.model, step)
    return stats


# ----------------------------------------------------------------------------- budget, logging, checkpoints

class Budget:
    """The run's length in steps. A step or epoch budget is known up front; a wall-clock budget (train.minutes) is
    estimated after 10 steps (the LR schedule needs a total), then once more at ~10 % of the run from the rate
    since step 10, when start-up costs no longer distort it. All ranks agree on each estimate."""

    def __init__(self, cfg: Config, n_train: int, ctx, start_step: int):
        self.cfg, self.n_train, self.ctx, self.start = cfg, n_train, ctx, start_step
        self.total = planned_steps(cfg, n_train)                     # None until estimated
        self.deadline = time.time() + 60 * cfg.train.minutes if cfg.train.minutes else None
        self.first: tuple[int, float] | None = None                  # (step, time) of the first estimate
        self.recheck = -1                                            # the step of the re-estimate

    @property
    def steps(self) -> int:
        return self.total if self.total is not None else 10 ** 9

    def lr(self, step: int) -> float:
        t = self.cfg.train
        return lr_at(step, self.steps, warmup_steps(self.cfg, self.n_train, self.steps), t.lr, t.min_lr)

    def update(self, step: int, elapsed: float) -> bool:
        """After each step: (re-)estimate a wall-clock budget; True when the total changed."""
        if self.deadline is None or not ((step - self.start == 10 and self.first is None) or step == self.recheck):
            return False
        now = time.time()
        per_step = elapsed / 10 if self.first is None else (now - self.first[1]) / (step - self.first[0])
        est = step + max(1, int((self.deadline - now) / per_step))
        self.total = int(distributed.agree(self.ctx, [est], "min")[0])   # all ranks stop together
        if self.first is None:                  # re-estimate at ~10 % of the run (a step every rank reaches)
            self.first, self.recheck = (step, now), step + max(5, (self.total - step) // 10)
        return True

    def pause(self, seconds: float) -> None:
        """Time spent evaluating (train.eval_every) is not training time: move the deadline and the rate's origin."""
        if self.deadline is not None:
            self.deadline += seconds
        if self.first is not None:
            self.first = (self.first[0], self.first[1] + seconds)

    def past_deadline(self) -> bool:
        return self.deadline is not None and time.time() >= self.deadline


class Logger:
    """Running loss sums (kept on the device, read once per check: every step on the CPU, every log_every steps on
    a GPU, as each read is a host synchronisation), the progress bar, and the scalars (rank 0): TensorBoard and
    log.jsonl, one JSON object per logged step ({"step": 10, "loss/total": ..., ...}), which needs no TensorBoard
    to read."""

    def __init__(self, tr: Trainer, writer, total: int | None, progress: bool, jsonl: Path | None = None):
        self.tr, self.writer = tr, writer
        self.jsonl = open(jsonl, "a") if jsonl is not None and writer is not None else None
        self.sums = torch.zeros(5, device=tr.device, dtype=torch.float64)
        self.n_summed, self.run_images = 0, 0
        self.check_every = 1 if tr.device.type == "cpu" else tr.cfg.train.log_every
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


def every_steps(text: str, cfg: Config, n_train: int, what: str) -> int:
    """train.eval_every / keep_every / --stop-after as steps ("N" or "Nep"); 0 = off."""
    every = parse_every(text, what)
    if every is None:
        return 0
    n, unit = every
    return n if unit == "steps" else n * steps_per_epoch(cfg, n_train)


def save_checkpoint(tr: Trainer, out_dir: Path, step: int, images_seen: int, wall: float, total_steps: int,
                    logger: Logger) -> None:
    """last.pt (the full training state) and ema.safetensors, written atomically by rank 0; the other ranks
    wait. Non-finite weights stop the run first, leaving the last good checkpoint as it is."""
    last_pt = out_dir / "checkpoints" / "last.pt"
    for name, model in (("weights", tr.model), ("EMA weights", tr.ema.model if tr.ema is not None else None)):
        if model is not None and not bool(torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all()):
            raise logger.diverged(f"{name} became non-finite (nan/inf) by step {step}", last_pt)

    def write() -> None:
        state = {"config": tr.cfg.to_dict(), "step": step, "total_steps": total_steps, "images_seen": images_seen,
                 "wall_seconds": wall, "model": ckpt.plain_state_dict(tr.model),
                 "ema": ckpt.plain_state_dict(tr.ema.model), "optimizer": tr.optimizer.state_dict(),
                 "rng": {"torch": torch.get_rng_state()}, "processes": tr.ctx.world}
        if tr.scaler is not None:
            state["scaler"] = tr.scaler.state_dict()
        ckpt.save_training_state(last_pt, state)
        ckpt.save_weights(out_dir / "checkpoints" / "ema.safetensors", state["ema"], tr.cfg.to_dict())
    distributed.all_ok(tr.ctx, write, only_main=True)


class _StopFlag:
    """SIGTERM and a first Ctrl-C: finish the current step, write a checkpoint, stop (resume with --resume).
    SIGTERM is always graceful, however many arrive (timeout, Slurm and torchrun send one to every process of a
    group, so a worker can get several); only a second Ctrl-C, from a person, aborts at once."""

    def __init__(self) -> None:
        self.stop = False
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "_StopFlag":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not in the main thread
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.stop and signum == signal.SIGINT and self.signal == signal.SIGINT:
            raise KeyboardInterrupt                     # a person's second Ctrl-C
        self.stop, self.signal = True, self.signal or signum

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():        # after a stop, later SIGTERMs of the same round are absorbed
            signal.signal(sig, signal.SIG_IGN if self.stop and sig == signal.SIGTERM else old)


# ----------------------------------------------------------------------------- the run

def train(cfg: Config, data: ImageData, out_dir: Path, resume: bool = False, stop_after: int | None = None,
          progress: bool = True, init: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Train according to cfg on data, writing the run into out_dir. Returns the metrics written.

    stop_after: stop (with a checkpoint) once this many steps are done in total, on the run's full schedule; the
    run can then be continued with resume=True (`hybvit train --stop-after N`). init: the weights a new run starts
    from (`hybvit train --init-from`; init_from.py).

    Inside a process group (torchrun; see distributed.py) every rank calls this: DistributedDataParallel over the
    ranks, the global batch train.batch_size split between them, and rank 0 alone writing the run (the other ranks
    return {"steps": ..., "rank": ...}).
    """
    with _StopFlag() as stop:              # from the start: a stop during setup ends after the first step
        return _run(cfg, data, Path(out_dir), resume, stop_after, progress, stop, init)


def _run(cfg: Config, data: ImageData, out_dir: Path, resume: bool, stop_after: int | None, progress: bool,
         stop: _StopFlag, init: dict[str, torch.Tensor] | None) -> dict[str, Any]:
    cfg.validate()
    t = cfg.train
    last_pt = out_dir / "checkpoints" / "last.pt"
    tr = setup(cfg, data, last_pt if resume else None, init)
    ctx = tr.ctx
    if stop_after is not None and stop_after <= tr.start_step:
        raise HybvitError(f"--stop-after {stop_after}: the run is already at step {tr.start_step}; give a later step")
    eval_every = every_steps(t.eval_every, cfg, len(data.x_train), "train.eval_every")
    keep_every = every_steps(t.keep_every, cfg, len(data.x_train), "train.keep_every")

    def open_run():
        out_dir.mkdir(parents=True, exist_ok=True)
        ckpt.remove_stale_temporaries(out_dir)                # left by a killed write
        ckpt.write_json(out_dir / "config.json", cfg.to_dict())
        trim_log(out_dir / "log.jsonl", tr.start_step)
        return SummaryWriter(str(out_dir / "tb"))
    writer = distributed.all_ok(ctx, open_run, only_main=True)            # None on the other ranks
    budget = Budget(cfg, len(data.x_train), ctx, tr.start_step)
    log = Logger(tr, writer, budget.total, progress, out_dir / "log.jsonl")

    def recipe(total: int) -> None:                 # rank 0 records it in config.json and says so
        note = decide_recipe(tr, total, len(data.x_train))
        if note is not None and ctx.main:
            ckpt.write_json(out_dir / "config.json", cfg.to_dict())
            log.write(note)
    if budget.total is not None:
        recipe(budget.total)
    evaluator = PeriodicEval(cfg, data, tr.diffusion, tr.device, tr.amp) if eval_every and ctx.main else None
    step, images_seen = tr.start_step, tr.prior_images
    if not resume:                                   # a run can be resumed from the moment its directory exists
        save_checkpoint(tr, out_dir, step, images_seen, 0.0, budget.steps, log)
    t0 = time.time()
    eval_seconds = 0.0
    if tr.device.type == "cpu" and t.threads:
        torch.set_num_threads(t.threads)
    governor = ThreadGovernor(tr.device.type == "cpu" and not ctx.distributed and not t.threads)
    tr.model.train()
    while step < budget.steps:
        lr = budget.lr(step)
        log.add(train_step(tr, step, lr))
        step += 1
        governor.check(step)
        images_seen += tr.images_per_step
        elapsed = time.time() - t0
        if budget.update(step, elapsed):
            log.set_total(budget.total)
            recipe(budget.total)
        # Ctrl-C / SIGTERM (on any rank) and the deadline. With several processes they are agreed over the CPU
        # control group at each check, so all ranks stop after the same step, whichever got the signal.
        stop_now, past_deadline = stop.stop, budget.past_deadline()
        if ctx.distributed:
            if step % log.check_every == 0:
                stop_now, past_deadline = (bool(v) for v in distributed.agree(ctx, [stop_now, past_deadline]))
            else:
                stop_now = past_deadline = False
        if past_deadline:
            budget.total = step
        log.check(step, lr, elapsed, step % t.log_every == 0 or step == budget.steps, last_pt)
        if log.bar is not None:
            log.bar.update(1)
        if t.sample_every and step % t.sample_every == 0 and tr.diff_batches is not None:
            distributed.all_ok(ctx, lambda s=step: log_samples(writer, tr.ema.model, tr.diffusion, cfg, tr.device,
                                                               s, n=min(64, t.num_samples), amp=tr.amp),
                               only_main=True)
        if eval_every and step % eval_every == 0:        # evaluation time is not training time
            t_eval = time.time()
            distributed.all_ok(ctx, lambda s=step: evaluator.run(tr.model, tr.ema.model, s, log), only_main=True)
            paused = time.time() - t_eval
            t0, eval_seconds = t0 + paused, eval_seconds + paused
            budget.pause(paused)
        asked = stop_after is not None and step >= stop_after
        interrupted = stop_now or asked
        if step % t.ckpt_every == 0 or interrupted:
            save_checkpoint(tr, out_dir, step, images_seen, tr.prior_wall + time.time() - t0, budget.steps, log)
        if keep_every and step % keep_every == 0:
            distributed.all_ok(ctx, lambda s=step: ckpt.save_weights(
                out_dir / "checkpoints" / f"ema-{s:07d}.safetensors", ckpt.plain_state_dict(tr.ema.model),
                cfg.to_dict()), only_main=True)
        if interrupted:
            governor.close()
            log.close()
            if ctx.main:
                why = (f"after step {step} of {budget.steps} as asked (--stop-after)" if asked and not stop_now
                       else f"at step {step}")
                print(f"stopped {why}; checkpoint written to {last_pt}; continue with "
                      f"`hybvit train --resume {out_dir}`" + (" (any number of processes)" if ctx.distributed
                                                               else ""))
            return {"steps": step, "interrupted": True, "stopped_after": asked and not stop_now}
    governor.close()
    if log.bar is not None:
        log.bar.close()
    train_seconds = time.time() - t0
    save_checkpoint(tr, out_dir, step, images_seen, tr.prior_wall + train_seconds, step, log)

    def finish_run() -> dict[str, Any]:                      # rank 0; the other ranks wait in all_ok
        ips = round(log.run_images / max(train_seconds, 1e-9), 1)
        metrics = finish(cfg, data, tr.model, tr.ema.model, tr.diffusion, out_dir, writer, tr.device, tr.amp,
                         log=lambda values: log.scalars(values, step), progress=progress,
                         train_images_per_second=ips, train_seconds=tr.prior_wall + train_seconds)
        metrics.update(steps=step, images_seen=images_seen,
                       wall_seconds=round(tr.prior_wall + time.time() - t0 + eval_seconds, 2),
                       train_seconds=round(tr.prior_wall + train_seconds, 2), images_per_second=ips,
                       train_gflops_per_second=round(log.flops_per_step * (step - tr.start_step)
                                                     / max(train_seconds, 1e-9) / 1e9, 2),
                       params=tr.model.num_params(), mode=t.mode, preset=cfg.preset, data=cfg.data.spec,
                       device=str(tr.device), amp=tr.amp, processes=ctx.world, grad_accum=t.grad_accum,
                       provenance=provenance(tr.device, ctx.world, tr.amp))
        if eval_seconds:
            metrics["eval_seconds"] = round(eval_seconds, 2)
        if governor.switches:                                # (step, threads) where a shared CPU changed them
            metrics["cpu_thread_switches"] = governor.switches
        ckpt.write_json(out_dir / "metrics.json", metrics)
        log.close()
        return metrics
    metrics = distributed.all_ok(ctx, finish_run, only_main=True)
    return metrics if ctx.main else {"steps": step, "rank": ctx.rank}
