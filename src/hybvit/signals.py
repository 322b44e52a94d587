"""Stopping a run cleanly: SIGTERM and a first Ctrl-C end the run after the current step with a checkpoint."""
from __future__ import annotations

import signal
from typing import Any


class StopFlag:
    """SIGTERM and a first Ctrl-C: finish the current step, write a checkpoint, stop (resume with --resume).
    SIGTERM is always graceful, however many arrive (timeout, Slurm and torchrun send one to every process of a
    group, so a worker can get several); only a second Ctrl-C, from a person, aborts at once."""

    def __init__(self) -> None:
        self.stop = False
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "StopFlag":
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
