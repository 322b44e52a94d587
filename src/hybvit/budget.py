"""A run's length and schedule in steps: the budget (steps, epochs or minutes), the warm-up, the learning rate at
each step, and periods given as "N" steps or "Nep" epochs.

An epoch is data.epoch_repeats passes over the training set in batches of train.batch_size (the paper's code counts
three). A wall-clock budget (train.minutes) is the one length not known before the first step: Budget estimates it
after 10 steps (the learning-rate schedule needs a total) and once more at about a tenth of the run.
"""
from __future__ import annotations

import time

from . import distributed
from .config import Config, parse_every
from .errors import HybvitError
from .optim import lr_at

WARMUP_MAX_FRAC = 0.1      # the warm-up never takes more than a tenth of the run
MIN_LR = 1e-6              # the floor of the cosine decay (the paper's code)


def steps_per_epoch(cfg: Config, n_train: int) -> int:
    return max(1, (cfg.data.epoch_repeats * n_train) // min(cfg.train.batch_size, n_train))


def planned_steps(cfg: Config, n_train: int) -> int | None:
    """Total steps from the budget; None for a wall-clock budget (estimated once training runs)."""
    opts = cfg.train
    if opts.steps:
        return int(opts.steps)
    if opts.epochs:
        return max(1, round(opts.epochs * steps_per_epoch(cfg, n_train)))
    if opts.minutes:
        return None
    raise HybvitError("no training budget: give --epochs, --steps or --minutes")


def warmup_steps(cfg: Config, n_train: int, total: int) -> int:
    w = cfg.train.warmup_epochs * steps_per_epoch(cfg, n_train)
    return max(1, int(min(w, WARMUP_MAX_FRAC * total)))


def every_steps(text: str, cfg: Config, n_train: int, what: str) -> int:
    """train.eval_every / keep_every / --stop-after as steps ("N" or "Nep"); 0 = off."""
    every = parse_every(text, what)
    if every is None:
        return 0
    n, unit = every
    return n if unit == "steps" else n * steps_per_epoch(cfg, n_train)


class Budget:
    """The run's length in steps. A step or epoch budget is known up front; a wall-clock budget (train.minutes) is
    estimated after 10 steps, then once more at ~10 % of the run from the rate since step 10, when start-up costs
    no longer distort it. All ranks agree on each estimate."""

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
        return lr_at(step, self.steps, warmup_steps(self.cfg, self.n_train, self.steps), self.cfg.train.lr, MIN_LR)

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
