"""CPU threads on a machine that other work shares.

The default thread count (`default_threads`) is what this process may use: the CPUs it may run on (its CPU
affinity, which Slurm's CPU binding and a container's cpuset set), capped by a cgroup CPU quota where one is set
(cgroup v2 `cpu.max`, v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`, read for this process's own cgroup and the
cgroups above it, rounded up to whole CPUs). On a 64-core node where a job was given 4 cores, that is 4, not 64.

PyTorch's OpenMP threads spin while they wait for each other at the end of every parallel region. Alone, that is
the fast path; when another process needs the same cores, one spinning thread holds a core while its partner waits
to be scheduled, and both runs slow down far beyond the 2x of sharing (the default digits run: 4-5x beside a second
run on 2 cores, docs/speed.md).

ThreadGovernor measures, about once a second, how much CPU time other processes took on the CPUs this process may
run on, and only those: "others" is the busy time of those CPUs (Linux /proc/stat, one line per CPU; time stolen by
a hypervisor counts as busy) minus this process's own time (/proc/self/stat), in cores. Load on the host's other
CPUs does not count, so a run on dedicated cores (a Slurm allocation, a container cpuset) never gives up threads
however busy the rest of the node is; it yields only where another process runs on its own cores. It gives training
the cores that are left: all threads while the others use less than 0.3 of a core, and `cores - round(others)`
threads (at least one) once they use more than 0.6 of a core for two readings in a row; back to all threads after
two readings under 0.3. Alone it never changes anything, so a run on an idle machine is bitwise the run it always
was. Only a single-process CPU run is governed; `train.threads=N` fixes N threads. Thread counts round differently:
a run that switched (metrics.json lists `cpu_thread_switches`) is not bitwise a fixed-thread run, nor is its resume
bitwise an uninterrupted run.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

Ticks = tuple[dict[int, int], int]   # (busy ticks of each CPU, ticks of this process)


def affinity() -> set[int]:
    """The CPUs this process may run on (all of them where the platform does not tell)."""
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


def _own_cgroup(proc_cgroup: Path, v2: bool) -> list[str]:
    """This process's cgroup as path parts: the v2 line `0::/path`, or v1's line for the cpu controller ([] = the
    root, also where /proc does not tell or the path leads outside the mount)."""
    try:
        for line in proc_cgroup.read_text().splitlines():
            hierarchy, controllers, path = line.split(":", 2)
            mine = hierarchy == "0" and controllers == "" if v2 else "cpu" in controllers.split(",")
            if mine:
                parts = [p for p in path.strip().split("/") if p]
                return [] if ".." in parts else parts
    except (OSError, ValueError):
        pass
    return []


def _quota(cgroup: Path, v2: bool) -> int | None:
    """Whole CPUs that one cgroup directory's quota allows (rounded up, at least 1); None where none is set."""
    try:
        if v2:
            quota, period = (cgroup / "cpu.max").read_text().split()[:2]
            if quota == "max":
                return None
            q, p = int(quota), int(period)
        else:
            q, p = (int((cgroup / f"cpu.cfs_{name}_us").read_text()) for name in ("quota", "period"))
    except (OSError, ValueError):
        return None
    return max(1, -(-q // p)) if q > 0 and p > 0 else None


def cgroup_cpus(root: str | Path = "/sys/fs/cgroup", proc_cgroup: str | Path = "/proc/self/cgroup") -> int | None:
    """The CPUs a cgroup CPU quota allows this process, None where none is set: the smallest quota of its own cgroup
    and those above it, v2 (`root`/.../cpu.max) and v1 (`root`/cpu/.../cpu.cfs_quota_us)."""
    root, proc_cgroup = Path(root), Path(proc_cgroup)
    limits = []
    for mount, v2 in ((root, True), (root / "cpu", False)):
        parts = _own_cgroup(proc_cgroup, v2)
        for depth in range(len(parts), -1, -1):          # the own cgroup, its parents, the mount's root
            limit = _quota(mount.joinpath(*parts[:depth]), v2)
            if limit is not None:
                limits.append(limit)
    return min(limits) if limits else None


def default_threads(root: str | Path = "/sys/fs/cgroup", proc_cgroup: str | Path = "/proc/self/cgroup") -> int:
    """The CPU threads this process may use: its CPU affinity, capped by a cgroup CPU quota where one is set."""
    cpus = len(affinity())
    quota = cgroup_cpus(root, proc_cgroup)
    return max(1, min(cpus, quota) if quota is not None else cpus)


def cpu_ticks(proc: str | Path = "/proc") -> Ticks | None:
    """(busy ticks of each CPU, from the `cpuN` lines of /proc/stat; ticks of this process, utime + stime of
    /proc/self/stat), or None where /proc does not tell."""
    proc = Path(proc)
    try:
        busy = {}
        for line in (proc / "stat").read_text().splitlines():
            if line.startswith("cpu") and line[3:4].isdigit():
                name, *fields = line.split()
                user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in fields[:8])
                busy[int(name[3:])] = user + nice + system + irq + softirq + steal
        own = (proc / "self" / "stat").read_text().rsplit(")", 1)[1].split()
        return (busy, int(own[11]) + int(own[12])) if busy else None
    except (OSError, ValueError, IndexError):
        return None


class ThreadGovernor:
    """Sets torch's threads from the others' CPU use of this process's CPUs (the module's docstring). `read`
    (default cpu_ticks), `cpus` (default: the affinity set) and `clock` (default time.monotonic) are for tests to
    feed readings; the cores it counts are len(cpus) where they are given, else default_threads()."""

    def __init__(self, enabled: bool, interval: float = 1.0, *, read: Callable[[], Ticks | None] | None = None,
                 cpus: set[int] | None = None, clock: Callable[[], float] = time.monotonic):
        self.full = torch.get_num_threads()
        self.read, self.clock = read or cpu_ticks, clock
        self.cpus = set(cpus) if cpus is not None else affinity()
        self.cores = len(self.cpus) if cpus is not None else default_threads()
        first = self.read() if enabled and self.full > 1 else None
        self.enabled = first is not None
        self.interval, self.threads = interval, self.full
        self.high = self.low = 0                 # consecutive readings above 0.6 / under 0.3 of a core
        self.switches: list[tuple[int, int]] = []   # (step, threads) at each change
        self.tick = os.sysconf("SC_CLK_TCK") if self.enabled else 100
        self._last = (self.clock(), self._busy(first[0]), first[1]) if self.enabled else None

    def _busy(self, per_cpu: dict[int, int]) -> int:
        """Busy ticks of the CPUs this process may run on."""
        return sum(ticks for cpu, ticks in per_cpu.items() if cpu in self.cpus)

    def check(self, step: int) -> None:
        """After a step: once per interval, read the others' CPU use of this process's CPUs and set the threads."""
        if not self.enabled or self.clock() - self._last[0] < self.interval:
            return
        now, ticks = self.clock(), self.read()
        if ticks is None or now <= self._last[0]:
            return
        busy, own = self._busy(ticks[0]), ticks[1]
        (t0, busy0, own0), self._last = self._last, (now, busy, own)
        others = max(0.0, ((busy - busy0) - (own - own0)) / self.tick / (now - t0))   # in cores
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




def run_threads(requested: int, distributed: bool) -> int:
    """The CPU threads of a training run: train.threads when set; else what this process may use (default_threads),
    unless OMP_NUM_THREADS or a process group (torchrun) already chose."""
    if requested:
        return requested
    if distributed or "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads()
    return default_threads()


__all__ = ["ThreadGovernor", "affinity", "cgroup_cpus", "cpu_ticks", "default_threads", "run_threads"]
