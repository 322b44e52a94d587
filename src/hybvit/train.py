"""Training for the three modes (ViT, GenViT, HybViT), readable top to bottom.

  vit     L = CE(classify(aug(x)), y)
  genvit  L = L_simple(x0)                                       (Eq. 15, L1 by default as the paper's code)
  hybvit  L = CE(classify(aug(x)), y) + alpha * L_simple(x0')    (Eq. 23; x and x0' are independent batches,
                                                                  the diffusion batch is never augmented)

AdamW (lr 1e-3, wd 0.05), linear warm-up then cosine decay per iteration, gradient clipping 1.0, EMA 0.999:
what the paper's code ran. Batches, noise and timesteps come from generators seeded by (seed, step), so a
run resumed from any checkpoint ends with exactly the weights of one that was never interrupted (on the CPU, with
the same number of threads).

The pieces, in the order train() uses them: setup (model, EMA, optimizer, resume), train_step (one optimizer
step), save_checkpoint, then the run: start_run, run_step (one turn of the loop) and finish_run. The budget in
steps is budget.py's, the progress output runlog.py's, the clean stop on a signal signals.py's.
"""
from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter

from . import checkpoint as ckpt
from . import distributed
from .budget import Budget, every_steps
from .config import Config
from .data import Batches, ImageData, check_batch_split
from .diffusion import GaussianDiffusion
from .errors import HybvitError
from .evaluate.end_of_run import PeriodicEval, finish, log_samples
from .init_from import load_into
from .model import ViT
from .objective import Objective, batch_inputs, shard
from .optim import EMA, build_optimizer
from .precision import autocast, enable_tf32, grad_scaler, resolve_amp, resolve_device
from .provenance import provenance
from .runlog import Logger, trim_log
from .sample import check_weights_fit
from .signals import StopFlag
from .threads import ThreadGovernor, run_threads

LOG_EVERY = 10                            # steps between logged scalars (and, on a GPU, loss checks)
DEVICE_CACHE_BYTES = 4 * 2 ** 30          # a training set up to this size lives on the GPU as uint8


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
    graphs: bool                           # CUDA graphs (train.compile on CUDA): mark each replay
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
    opts = cfg.train
    ctx = distributed.context()
    device = distributed.device_for(resolve_device(opts.device), ctx)
    if device.type == "cpu":
        torch.set_num_threads(run_threads(opts.threads, ctx.distributed))
    check_batch_split(cfg, len(data.x_train), ctx.world)
    amp = distributed.broadcast(ctx, resolve_amp(opts.amp, device))        # one precision on every rank
    enable_tf32(device)                                                  # fp32 matmuls in TF32 where GPUs have it
    torch.manual_seed(opts.seed)
    model = ViT(cfg.model)
    if init is not None:
        load_into(model, init)
    model = model.to(device)
    ema = EMA(model, opts.ema_decay, opts.ema_warmup) if ctx.main else None
    diffusion = GaussianDiffusion.from_config(cfg.diffusion)
    optimizer = build_optimizer(model, cfg, device, amp)

    # On CUDA, hybvit's two batches go through one forward pass (bigger matmuls: 1.96x the two-pass step on an
    # H200, slower on CPUs; docs/speed.md), and torch.compile uses CUDA graphs (mode reduce-overhead).
    cuda = device.type == "cuda"
    joint = cuda and opts.mode == "hybvit"
    mode = "reduce-overhead" if cuda else "default"
    net = torch.compile(model, mode=mode) if opts.compile else model
    joint_net = torch.compile(model.classify_and_denoise, mode=mode) if opts.compile and joint else None
    objective = Objective(model, net, diffusion, opts.alpha, opts.label_smoothing, joint=joint, joint_net=joint_net)
    if ctx.distributed:
        # vit never uses the time MLP, genvit never the classifier head: DDP must look for unused parameters
        # there (their gradients stay None on every rank, as in one process); hybvit uses every parameter.
        objective = DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None,
                                            find_unused_parameters=opts.mode != "hybvit")

    # Small datasets live on the training device as uint8 and are augmented there: a GPU step never waits for
    # CPU workers. Larger ones stay in host memory and each batch is copied over: pinned, or for a prepared
    # dataset the shared page cache (one copy per node, not per process).
    resident = device.type == "cpu" or data.x_train.numel() <= DEVICE_CACHE_BYTES
    host = data.x_train if data.mapped else data.x_train.pin_memory() if not resident else None
    # The batches are global: Batches gives the step's train.batch_size indices whatever the number of processes
    # (the role of a DistributedSampler), and rank r trains on piece r of them. So the data order does not depend
    # on the number of processes, and a run resumed with another number continues the same sequence.
    n = len(data.x_train)
    tr = Trainer(cfg, ctx, device, amp, model, ema, optimizer, diffusion, objective,
                 x_train=data.x_train.to(device) if resident else host,
                 y_train=data.y_train.to(device),
                 ce_batches=Batches(n, opts.batch_size, opts.seed, stream=0) if opts.mode != "genvit" else None,
                 diff_batches=Batches(n, opts.batch_size, opts.seed, stream=1) if opts.mode != "vit" else None,
                 graphs=opts.compile and cuda,
                 scaler=grad_scaler(amp, device))
    if resume_from is not None:
        _load(tr, resume_from)
    return tr


def _load(tr: Trainer, last_pt: Path) -> None:
    """Continue from a checkpoint. Rank 0 reads it and hands the other ranks what they need: the run directory
    need not be visible from every node, and a checkpoint of any number of processes resumes on any other."""
    ctx = tr.ctx
    state = distributed.all_ok(ctx, functools.partial(ckpt.load_training_state, last_pt), only_main=True)
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
    opts, ctx = tr.cfg.train, tr.ctx
    for group in tr.optimizer.param_groups:
        group["lr"] = lr
    ce_inputs, diff_inputs = batch_inputs(tr.cfg, step, tr.x_train, tr.y_train, tr.device, tr.ce_batches,
                                         tr.diff_batches, tr.diffusion, share=(ctx.rank, ctx.world))
    accum = opts.grad_accum
    tr.optimizer.zero_grad(set_to_none=True)
    stats = 0
    for m in range(accum):
        last = m == accum - 1                 # DDP averages the gradients over the ranks after the last
        with (tr.objective.no_sync() if ctx.distributed and not last else contextlib.nullcontext()):
            if tr.graphs:                     # CUDA graphs: each micro-batch is a new replay
                torch.compiler.cudagraph_mark_step_begin()
            with autocast(tr.amp, tr.device):
                loss, s = tr.objective(shard(ce_inputs, m, accum), shard(diff_inputs, m, accum))   # micro-batch m
            # mean over the local piece, / A here, averaged over K ranks by DDP: the global batch mean
            loss = loss / accum if accum > 1 else loss
            (tr.scaler.scale(loss) if tr.scaler is not None else loss).backward()
        stats = stats + (s / accum if accum > 1 else s)
    if tr.scaler is not None:                 # fp16: true gradients for the clip; a step with inf/nan is skipped
        tr.scaler.unscale_(tr.optimizer)
    if opts.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(tr.model.parameters(), opts.grad_clip)
    if tr.scaler is not None:
        tr.scaler.step(tr.optimizer)
        tr.scaler.update()
    else:
        tr.optimizer.step()
    if tr.ema is not None:
        tr.ema.update(tr.model, step)
    return stats



# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(tr: Trainer, out_dir: Path, step: int, images_seen: int, wall: float, total_steps: int,
                    logger: Logger) -> None:
    """last.pt (the full training state) and ema.safetensors, written atomically by rank 0; the other ranks
    wait. Non-finite weights stop the run first, leaving the last good checkpoint as it is."""
    last_pt = out_dir / "checkpoints" / "last.pt"
    for name, model in (("weights", tr.model), ("EMA weights", tr.ema.model if tr.ema is not None else None)):
        if model is not None and not bool(torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all()):
            raise logger.diverged(f"{name} became non-finite (nan/inf) by step {step}", last_pt)

    distributed.all_ok(tr.ctx, functools.partial(_write_checkpoint, tr, out_dir, step, images_seen, wall,
                                                 total_steps), only_main=True)


def _write_checkpoint(tr: Trainer, out_dir: Path, step: int, images_seen: int, wall: float, total_steps: int) -> None:
    state = {"config": tr.cfg.to_dict(), "step": step, "total_steps": total_steps, "images_seen": images_seen,
             "wall_seconds": wall, "model": ckpt.plain_state_dict(tr.model),
             "ema": ckpt.plain_state_dict(tr.ema.model), "optimizer": tr.optimizer.state_dict(),
             "rng": {"torch": torch.get_rng_state()}, "processes": tr.ctx.world}
    if tr.scaler is not None:
        state["scaler"] = tr.scaler.state_dict()
    ckpt.save_training_state(out_dir / "checkpoints" / "last.pt", state)
    ckpt.save_weights(out_dir / "checkpoints" / "ema.safetensors", state["ema"], tr.cfg.to_dict())


def _keep_weights(tr: Trainer, out_dir: Path, step: int) -> None:
    """train.keep_every: the EMA weights of this step, kept beside the checkpoint (rank 0)."""
    ckpt.save_weights(out_dir / "checkpoints" / f"ema-{step:07d}.safetensors", ckpt.plain_state_dict(tr.ema.model),
                      tr.cfg.to_dict())


# ----------------------------------------------------------------------------- the run

@dataclass
class RunState:
    """What the loop carries from one step to the next (start_run builds it)."""
    out_dir: Path
    writer: Any                            # TensorBoard's SummaryWriter on rank 0, None on the other ranks
    budget: Budget
    log: Logger
    evaluator: PeriodicEval | None         # train.eval_every, rank 0
    stop: StopFlag
    stop_after: int | None
    eval_every: int                        # steps; 0 = off
    keep_every: int
    progress: bool
    step: int
    images_seen: int
    governor: ThreadGovernor | None = None
    t0: float = 0.0                        # when training started, moved on by the time spent evaluating
    eval_seconds: float = 0.0
    signalled: bool = False                # stopped by SIGTERM / Ctrl-C
    asked: bool = False                    # stopped by --stop-after

    @property
    def last_pt(self) -> Path:
        return self.out_dir / "checkpoints" / "last.pt"


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
    with StopFlag() as stop:              # from the start: a stop during setup ends after the first step
        cfg.validate()
        out_dir = Path(out_dir)
        tr = setup(cfg, data, out_dir / "checkpoints" / "last.pt" if resume else None, init)
        run = start_run(tr, data, out_dir, resume, stop_after, progress, stop)
        while run.step < run.budget.steps:
            if run_step(tr, run):
                return stopped(tr, run)
        return finish_run(tr, run, data)


def start_run(tr: Trainer, data: ImageData, out_dir: Path, resume: bool, stop_after: int | None, progress: bool,
              stop: StopFlag) -> RunState:
    """Open the run folder (config.json, log.jsonl, TensorBoard), the budget and the logger; a new run writes its
    first checkpoint at once, so it can be resumed from the moment its folder exists."""
    cfg, ctx, opts, n = tr.cfg, tr.ctx, tr.cfg.train, len(data.x_train)
    if stop_after is not None and stop_after <= tr.start_step:
        raise HybvitError(f"--stop-after {stop_after}: the run is already at step {tr.start_step}; give a later step")
    eval_every = every_steps(opts.eval_every, cfg, n, "train.eval_every")
    keep_every = every_steps(opts.keep_every, cfg, n, "train.keep_every")
    writer = distributed.all_ok(ctx, functools.partial(_open_run, cfg, out_dir, tr.start_step), only_main=True)
    budget = Budget(cfg, n, ctx, tr.start_step)
    log = Logger(tr, writer, budget.total, progress, out_dir / "log.jsonl", LOG_EVERY)
    evaluator = PeriodicEval(cfg, data, tr.diffusion, tr.device, tr.amp) if eval_every and ctx.main else None
    run = RunState(out_dir, writer, budget, log, evaluator, stop, stop_after, eval_every, keep_every, progress,
                   step=tr.start_step, images_seen=tr.prior_images)
    if not resume:
        save_checkpoint(tr, out_dir, run.step, run.images_seen, 0.0, budget.steps, log)
    run.t0 = time.time()
    run.governor = ThreadGovernor(tr.device.type == "cpu" and not ctx.distributed and not opts.threads)
    tr.model.train()
    return run


def _open_run(cfg: Config, out_dir: Path, start_step: int) -> SummaryWriter:
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt.remove_stale_temporaries(out_dir)                # left by a killed write
    ckpt.write_json(out_dir / "config.json", cfg.to_dict())
    trim_log(out_dir / "log.jsonl", start_step)
    return SummaryWriter(str(out_dir / "tb"))


def run_step(tr: Trainer, run: RunState) -> bool:
    """One turn of the loop: a training step, then what is due after it (the budget's estimate, the stop checks,
    logging, sample grids, evaluation, checkpoints). True when the run stops here (a signal or --stop-after)."""
    ctx, opts, budget, log = tr.ctx, tr.cfg.train, run.budget, run.log
    lr = budget.lr(run.step)
    log.add(train_step(tr, run.step, lr))
    run.step += 1
    step = run.step
    run.governor.check(step)
    run.images_seen += tr.images_per_step
    elapsed = time.time() - run.t0
    if budget.update(step, elapsed):
        log.set_total(budget.total)
    # Ctrl-C / SIGTERM (on any rank) and the deadline. With several processes they are agreed over the CPU
    # control group at each check, so all ranks stop after the same step, whichever got the signal.
    stop_now, past_deadline = run.stop.stop, budget.past_deadline()
    if ctx.distributed:
        if step % log.check_every == 0:
            stop_now, past_deadline = (bool(v) for v in distributed.agree(ctx, [stop_now, past_deadline]))
        else:
            stop_now = past_deadline = False
    if past_deadline:
        budget.total = step
    log.check(step, lr, elapsed, step % LOG_EVERY == 0 or step == budget.steps, run.last_pt)
    if log.bar is not None:
        log.bar.update(1)
    if run.eval_every and step % run.eval_every == 0:        # evaluation time is not training time
        t_eval = time.time()
        distributed.all_ok(ctx, functools.partial(_evaluate, tr, run), only_main=True)
        paused = time.time() - t_eval
        run.t0, run.eval_seconds = run.t0 + paused, run.eval_seconds + paused
        budget.pause(paused)
    run.signalled, run.asked = stop_now, run.stop_after is not None and step >= run.stop_after
    if step % opts.ckpt_every == 0 or run.signalled or run.asked:
        save_checkpoint(tr, run.out_dir, step, run.images_seen, tr.prior_wall + time.time() - run.t0,
                        budget.steps, log)
    if run.keep_every and step % run.keep_every == 0:
        distributed.all_ok(ctx, functools.partial(_keep_weights, tr, run.out_dir, step), only_main=True)
    return run.signalled or run.asked


def _evaluate(tr: Trainer, run: RunState) -> None:
    """train.eval_every (rank 0): the metrics, and a grid of 64 samples to TensorBoard in the generative modes."""
    run.evaluator.run(tr.model, tr.ema.model, run.step, run.log)
    if tr.diff_batches is not None:
        log_samples(run.writer, tr.ema.model, tr.diffusion, tr.cfg, tr.device, run.step, n=64, amp=tr.amp)


def stopped(tr: Trainer, run: RunState) -> dict[str, Any]:
    """The run stopped early with a checkpoint: say how to continue it."""
    run.governor.close()
    run.log.close()
    if tr.ctx.main:
        why = (f"after step {run.step} of {run.budget.steps} as asked (--stop-after)"
               if run.asked and not run.signalled else f"at step {run.step}")
        print(f"stopped {why}; checkpoint written to {run.last_pt}; continue with "
              f"`hybvit train --resume {run.out_dir}`" + (" (any number of processes)" if tr.ctx.distributed else ""))
    return {"steps": run.step, "interrupted": True, "stopped_after": run.asked and not run.signalled}


def finish_run(tr: Trainer, run: RunState, data: ImageData) -> dict[str, Any]:
    """The last checkpoint, then the end-of-run evaluation and metrics.json (rank 0; the other ranks wait)."""
    run.governor.close()
    if run.log.bar is not None:
        run.log.bar.close()
    train_seconds = time.time() - run.t0
    save_checkpoint(tr, run.out_dir, run.step, run.images_seen, tr.prior_wall + train_seconds, run.step, run.log)
    metrics = distributed.all_ok(tr.ctx, functools.partial(_write_metrics, tr, run, data, train_seconds),
                                 only_main=True)
    return metrics if tr.ctx.main else {"steps": run.step, "rank": tr.ctx.rank}


def _write_metrics(tr: Trainer, run: RunState, data: ImageData, train_seconds: float) -> dict[str, Any]:
    cfg, opts, log, step = tr.cfg, tr.cfg.train, run.log, run.step
    ips = round(log.run_images / max(train_seconds, 1e-9), 1)
    metrics = finish(cfg, data, tr.model, tr.ema.model, tr.diffusion, run.out_dir, run.writer, tr.device, tr.amp,
                     log=functools.partial(_log_final, log, step), progress=run.progress,
                     train_images_per_second=ips, train_seconds=tr.prior_wall + train_seconds)
    metrics.update(steps=step, images_seen=run.images_seen,
                   wall_seconds=round(tr.prior_wall + time.time() - run.t0 + run.eval_seconds, 2),
                   train_seconds=round(tr.prior_wall + train_seconds, 2), images_per_second=ips,
                   train_gflops_per_second=round(log.flops_per_step * (step - tr.start_step)
                                                 / max(train_seconds, 1e-9) / 1e9, 2),
                   params=tr.model.num_params(), mode=opts.mode, preset=cfg.preset, data=cfg.data.spec,
                   device=str(tr.device), amp=tr.amp, processes=tr.ctx.world, grad_accum=opts.grad_accum,
                   provenance=provenance(tr.device, tr.ctx.world, tr.amp))
    if run.eval_seconds:
        metrics["eval_seconds"] = round(run.eval_seconds, 2)
    if run.governor.switches:                                # (step, threads) where a shared CPU changed them
        metrics["cpu_thread_switches"] = run.governor.switches
    ckpt.write_json(run.out_dir / "metrics.json", metrics)
    log.close()
    return metrics


def _log_final(log: Logger, step: int, values: dict[str, float]) -> None:
    log.scalars(values, step)
