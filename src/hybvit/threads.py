"""CPU threads on a machine that other work shares.

PyTorch's OpenMP threads spin while they wait for each other at the end of every parallel region. Alone, that is
the fast path; when another process needs the same cores, one spinning thread holds a core while its partner waits
to be scheduled, and both runs slow down far beyond the 2x of sharing (the default digits run: 4-5x beside a second
run on 2 cores, docs/speed.md).

ThreadGovernor measures, about once a second, how much of the machine's CPU time went to other processes (Linux
/proc/stat minus this process's own time, /proc/self/stat; time stolen by a hypervisor counts as other), and gives
training the cores that are left: all threads while the others use less than 0.3 of a core, and
`cores - round(others)` threads (at least one) once they use more than 0.6 of a core for two readings in a row;
back to all threads after two readings under 0.3. Alone it never changes anything, so a run on an idle machine is
bitwise the run it always was. Only a single-process CPU run is governed; `train.threads=N` fixes N threads. Thread
counts round differently: a run that switched (metrics.json lists `cpu_thread_switches`) is not bitwise a
fixed-thread run, nor is its resume bitwise an uninterrupted run.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch


def cpu_ticks() -> tuple[int, int] | None:
    """(busy ticks of the whole machine, ticks of this process), or None where /proc does not tell."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in fields[:8])
        own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        return user + nice + system + irq + softirq + steal, int(own[11]) + int(own[12])   # utime + stime
    except (OSError, ValueError, IndexError):
        return None


class ThreadGovernor:
    def __init__(self, enabled: bool, interval: float = 1.0):
        self.full = torch.get_num_threads()
        self.cores = os.cpu_count() or self.full
        self.enabled = enabled and self.full > 1 and cpu_ticks() is not None
        self.interval, self.threads = interval, self.full
        self.high = self.low = 0                 # consecutive readings above 0.6 / under 0.3 of a core
        self.switches: list[tuple[int, int]] = []   # (step, threads) at each change
        self.tick = os.sysconf("SC_CLK_TCK") if self.enabled else 100
        self._last = (time.monotonic(), *cpu_ticks()) if self.enabled else None

    def check(self, step: int) -> None:
        """After a step: once per interval, read the others' CPU use and set the threads."""
        if not self.enabled or time.monotonic() - self._last[0] < self.interval:
            return
        now, ticks = time.monotonic(), cpu_ticks()
        if ticks is None:
            return
        (t0, busy0, own0), self._last = self._last, (now, *ticks)
        others = max(0.0, ((ticks[0] - busy0) - (ticks[1] - own0)) / self.tick / (now - t0))   # in cores
        self.high = self.high + 1 if others > 0.6 else 0
        self.low = self.low + 1 if others < 0.3 else 0
        want = self.threads
        if self.high >= 2:
            want = max(1, min(self.full, self.cores - round(others)))
        elif self.low >= 2:
            want = self.full
        if want != self.threads:
            torch.set_num_threads(want)
            self.threads = want
            self.switches.append((step, want))

    def close(self) -> None:
        """Give the process all its threads back (sampling and evaluation after training)."""
        if self.enabled and self.threads != self.full:
            torch.set_num_threads(self.full)
            self.threads = self.full


__all__ = ["ThreadGovernor", "cpu_ticks"]
