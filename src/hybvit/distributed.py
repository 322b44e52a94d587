"""Several processes (torchrun): the process group and the few collectives hybvit needs.

    torchrun --nproc_per_node=K -m hybvit train ...      # one process per GPU (or K CPU processes)

torchrun sets WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. `init()` reads them and starts the default
process group: NCCL for CUDA tensors plus gloo for CPU tensors where CUDA is available, gloo alone otherwise; each
process uses GPU LOCAL_RANK. Without torchrun (WORLD_SIZE unset or 1) nothing is started and every helper here is
the identity, so single-process code pays nothing.

A second, gloo-only group (`Context.control`) carries the small host-side agreements: stop flags, "did rank 0's
checkpoint write succeed", Python objects. It never synchronises a GPU, and its timeout is long
(`CONTROL_TIMEOUT`) because the other ranks wait on it while rank 0 alone writes checkpoints or runs the end-of-run
evaluation; a rank that dies closes its connections, so the others still fail at once instead of waiting it out.

The failure rule: work done by some ranks only goes through `all_ok`, which every rank calls; when any rank raised,
every rank raises, the failing one its own error and the others `CollectiveError`, which the command line prints
on rank 0 only. No rank is ever left waiting for one that has stopped.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from .errors import HybvitError

CONTROL_TIMEOUT = timedelta(hours=24)
_AGREED = "_hybvit_agreed"                      # set on an exception every rank has heard of (all_ok)
T = TypeVar("T")


class CollectiveError(HybvitError):
    """An error all ranks stop on together (another rank failed, or all saw the same NaN). Rank 0 prints it; the
    other ranks exit with status 2 without repeating it."""


@dataclass(frozen=True)
class Context:
    """Where this process stands: its rank among `world` processes, its GPU index on the node, the control group."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    control: Any = None

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes checkpoints, logs, samples and metrics."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


SINGLE = Context()
_control: tuple[Any, Any] | None = None          # (the default group it belongs to, the control group)
_sharing: Context | None = None                  # inside shared_work(): map_batches splits over these ranks


def launched() -> bool:
    """True when a launcher (torchrun) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank_from_env() -> int:
    return int(os.environ.get("RANK", "0")) if launched() else 0


def init() -> Context:
    """Start the process group from torchrun's environment (once); the single-process Context without torchrun."""
    if not launched():
        return SINGLE
    if not dist.is_initialized():
        backend = "gloo"
        if torch.cuda.is_available() and dist.is_nccl_available():
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            if local_rank < torch.cuda.device_count():      # (more processes than GPUs: refused in device_for)
                torch.cuda.set_device(local_rank)
            backend = "cpu:gloo,cuda:nccl"                   # DDP on GPUs over NCCL, CPU tensors over gloo
        dist.init_process_group(backend=backend)
    return context()


def context() -> Context:
    """The running process group as a Context (created by `init` or by the caller, e.g. a test with
    init_process_group); the single-process Context when there is none or it has one process."""
    global _control
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return SINGLE
    world_group = dist.group.WORLD
    if _control is None or _control[0] is not world_group:   # collective: every rank creates it at the same point
        _control = (world_group, dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT))
    rank = dist.get_rank()
    return Context(rank, dist.get_world_size(), int(os.environ.get("LOCAL_RANK", str(rank))), _control[1])


def shutdown() -> None:
    """Tear the process group down after a successful run (on errors the process just exits). The ranks meet at
    a barrier first: without it, a rank whose peer had already torn down and exited sometimes aborted in its own
    teardown (SIGABRT, "terminate called without an active exception"; measured on torch 2.14 with a group the
    caller started, 5-6 of 14 two-process runs, none of 28 with the barrier)."""
    global _control
    if dist.is_available() and dist.is_initialized():
        if _control is not None and _control[0] is dist.group.WORLD:
            dist.barrier(group=_control[1])                  # the gloo control group: CPU, with its own timeout
        dist.destroy_process_group()
    _control = None


def device_for(device: torch.device, ctx: Context) -> torch.device:
    """With several processes each one drives GPU LOCAL_RANK of its node, whatever CUDA index the config names."""
    if ctx.distributed and device.type == "cuda":
        if ctx.local_rank >= torch.cuda.device_count():
            raise HybvitError(f"process {ctx.local_rank} of this node has no GPU of its own (the node has "
                              f"{torch.cuda.device_count()}); start at most that many: torchrun "
                              f"--nproc_per_node={torch.cuda.device_count()}")
        return torch.device("cuda", ctx.local_rank)
    return device


# ----------------------------------------------------------------------------- collectives

def all_ok(ctx: Context, fn: Callable[[], T], only_main: bool = False) -> T | None:
    """Run fn() (on rank 0 alone when only_main; the other ranks wait here) and agree on the outcome: if any rank
    raised, every rank raises (that rank its own exception, the others CollectiveError naming it). When every rank
    fails with rank 0's one-line error (a missing file, say), the others raise it as a CollectiveError, which the
    command line does not repeat.

    Calls nest: an error already agreed on inside fn passes through without a second round (code inside fn must
    let such an error through, never replace it on some ranks only). So a rank that fails
    between two inner agreements meets the others at their next one (the same all-reduce), and every rank still
    stops after the same number of rounds."""
    if not ctx.distributed:
        return fn()
    result, error = None, None
    try:
        if ctx.main or not only_main:
            result = fn()
    except BaseException as e:  # noqa: BLE001 - re-raised below, after the others have heard of it
        if getattr(e, _AGREED, False):       # a nested all_ok already agreed on it with every rank: no second round
            raise
        error = e
    failed = torch.zeros(ctx.world, dtype=torch.float64)
    failed[ctx.rank] = float(error is not None)
    dist.all_reduce(failed, group=ctx.control)
    bad = [r for r, f in enumerate(failed.tolist()) if f]
    if len(bad) == ctx.world:                    # all failed: a one-line error that repeats rank 0's is printed once
        texts: list[Any] = [None] * ctx.world
        try:
            text = f"{type(error).__name__}: {error}"
        except Exception:  # noqa: BLE001 - every rank must reach the gather below
            text = type(error).__name__
        dist.all_gather_object(texts, text, group=ctx.control)
        if not ctx.main and isinstance(error, HybvitError) and texts[ctx.rank] == texts[0]:
            error = CollectiveError(f"every rank failed as rank 0 did: {error}")
    if error is None and bad:
        error = CollectiveError(f"rank {', '.join(map(str, bad))} failed (its error is printed above); all "
                                f"{ctx.world} processes stopped")
    if error is not None:
        with contextlib.suppress(AttributeError, TypeError):
            setattr(error, _AGREED, True)
        raise error
    return result


def agree(ctx: Context, values: list[float], op: str = "max") -> list[float]:
    """Element-wise max (or min) of a few numbers over all ranks, on the control group: no GPU synchronisation."""
    if not ctx.distributed:
        return list(values)
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.MIN, group=ctx.control)
    return t.tolist()


def sum_over_ranks(ctx: Context, x: torch.Tensor) -> torch.Tensor:
    """The sum of x over all ranks (a new tensor on x's device); x itself when there is one process."""
    if not ctx.distributed:
        return x
    y = x.clone()
    dist.all_reduce(y)
    return y


def broadcast(ctx: Context, obj: T) -> T:
    """Rank 0's Python object, on every rank (pickled over the control group: only between this job's ranks)."""
    if not ctx.distributed:
        return obj
    box = [obj if ctx.main else None]
    dist.broadcast_object_list(box, src=0, group=ctx.control)
    return box[0]


def gather(ctx: Context, obj: Any) -> list[Any] | None:
    """Every rank's object, in rank order, on rank 0 (None elsewhere)."""
    if not ctx.distributed:
        return [obj]
    out = [None] * ctx.world if ctx.main else None
    dist.gather_object(obj, out, dst=0, group=ctx.control)
    return out


# ----------------------------------------------------------------------------- shared batch loops

@contextlib.contextmanager
def shared_work(ctx: Context) -> Iterator[None]:
    """Inside, every `map_batches` loop splits its batches over ctx's ranks and gathers the results on every rank
    (`hybvit evaluate` under torchrun). Every rank must then run the same code: a loop run by one rank alone (the
    end-of-run evaluation of training, say) is never inside."""
    global _sharing
    before, _sharing = _sharing, (ctx if ctx.distributed else None)
    try:
        yield
    finally:
        _sharing = before


def my_batches(count: int) -> list[int]:
    """The batches k of `count` this process runs: all of them, or inside shared_work those with k mod K = rank."""
    ctx = _sharing
    return list(range(count)) if ctx is None else list(range(ctx.rank, count, ctx.world))


def map_batches(n: int, batch_size: int, fn: Callable[[int, int], T]) -> list[T]:
    """[fn(start, stop) for each batch of range(n) in steps of batch_size], in batch order. Inside shared_work,
    batch k runs on rank k mod K and every rank receives every result (pickled over the control group, so fn
    returns CPU objects); each result must be a function of its batch alone (seeded by its start, say), and then
    the list equals one process's. A rank whose fn raises stops every rank (the `all_ok` rule): it raises its own
    error, the others CollectiveError, and none waits on a gather that will not come."""
    starts = list(range(0, n, batch_size))
    ctx = _sharing

    def run_mine() -> list[T]:
        return [fn(starts[k], min(starts[k] + batch_size, n)) for k in my_batches(len(starts))]
    if ctx is None:
        return run_mine()
    mine = all_ok(ctx, run_mine)
    shares: list[Any] = [None] * ctx.world
    dist.all_gather_object(shares, mine, group=ctx.control)
    return [shares[k % ctx.world][k // ctx.world] for k in range(len(starts))]


def everywhere(check: Callable[[], bool]) -> bool:
    """check() on every rank inside shared_work, true only if it is true on all of them (a cache file that one
    node lacks is a miss for every rank, so all take the same path); check() itself outside."""
    world = 1 if _sharing is None else _sharing.world
    return all(map_batches(world, 1, lambda start, stop: bool(check())))    # batch k runs on rank k


__all__ = ["SINGLE", "CollectiveError", "Context", "agree", "all_ok", "broadcast", "context", "device_for",
           "everywhere", "gather", "init", "launched", "map_batches", "my_batches", "rank_from_env", "shared_work",
           "shutdown", "sum_over_ranks"]
