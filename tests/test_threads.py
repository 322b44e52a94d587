"""CPU threads (threads.py): the default is what this process may use (its CPU affinity, capped by a cgroup CPU
quota), and the governor watches only the CPUs this process may run on: fed readings of dedicated cores on a busy
host never make it yield; another process on its own cores does."""
import os
import subprocess
import sys

import pytest

import hybvit.threads as threads


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no sched_setaffinity on this platform")
def test_default_threads_follow_a_restricted_affinity():
    code = ("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "from hybvit.threads import default_threads; print(default_threads(), os.cpu_count())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == "1"


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_default_threads_follow_a_cgroup_quota(tmp_path, monkeypatch):
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: set(range(8)))
    none = tmp_path / "no-proc-cgroup"                       # /proc does not tell: the mount's root cgroup
    v2 = tmp_path / "v2"
    write(v2 / "cpu.max", "150000 100000\n")                   # 1.5 CPUs: rounded up
    assert threads.default_threads(v2, none) == 2
    write(v2 / "cpu.max", "max 100000\n")                      # no quota: the affinity
    assert threads.default_threads(v2, none) == 8
    write(v2 / "cpu.max", "20000 100000\n")                    # under one CPU: still one thread
    assert threads.default_threads(v2, none) == 1
    own = tmp_path / "cgroup"                                  # the process's own cgroup and those above it
    write(own, "0::/job/step\n")
    write(v2 / "cpu.max", "max 100000\n")
    write(v2 / "job" / "cpu.max", "300000 100000\n")
    write(v2 / "job" / "step" / "cpu.max", "max 100000\n")
    assert threads.default_threads(v2, own) == 3
    write(v2 / "job" / "step" / "cpu.max", "200000 100000\n")
    assert threads.default_threads(v2, own) == 2
    v1 = tmp_path / "v1"
    write(v1 / "cpu" / "cpu.cfs_quota_us", "150000\n")
    write(v1 / "cpu" / "cpu.cfs_period_us", "100000\n")
    assert threads.default_threads(v1, none) == 2
    write(v1 / "cpu" / "cpu.cfs_quota_us", "-1\n")             # no quota
    assert threads.default_threads(v1, none) == 8
    write(own, "4:memory:/elsewhere\n3:cpu,cpuacct:/slurm/job1\n0::/\n")
    write(v1 / "cpu" / "slurm" / "job1" / "cpu.cfs_quota_us", "400000\n")
    write(v1 / "cpu" / "slurm" / "job1" / "cpu.cfs_period_us", "100000\n")
    assert threads.default_threads(v1, own) == 4
    assert threads.default_threads(tmp_path / "missing", none) == 8


def test_cpu_ticks_reads_each_cpu(tmp_path):
    write(tmp_path / "stat", "cpu  30 0 6 100 1 0 0 0 0 0\ncpu0 10 1 2 50 1 0 0 3 0 0\n"
                             "cpu1 20 0 4 50 0 1 1 0 0 0\nintr 5 0\nctxt 7\n")
    write(tmp_path / "self" / "stat", "42 (a name) with) R " + " ".join(["0"] * 10) + " 11 4 0 0 20 0\n")
    assert threads.cpu_ticks(tmp_path) == ({0: 16, 1: 26}, 15)
    assert threads.cpu_ticks(tmp_path / "missing") is None


class Host:
    """Fed /proc readings: a fake clock and busy ticks per CPU, 100 ticks a second."""

    def __init__(self, cpus: int):
        self.t, self.busy, self.own = 0.0, dict.fromkeys(range(cpus), 0), 0

    def read(self):
        return dict(self.busy), self.own

    def second(self, gov, step, own, others):
        """One second: this process used `own` cores (spread over its CPUs), other processes `others[cpu]`."""
        self.t += 1.0
        tick = gov.tick
        self.own += round(sum(own.values()) * tick)
        for cpu in self.busy:
            self.busy[cpu] += round((own.get(cpu, 0.0) + others.get(cpu, 0.0)) * tick)
        gov.check(step)


@pytest.fixture
def governor(monkeypatch):
    set_to = []
    monkeypatch.setattr(threads.torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(threads.torch, "set_num_threads", lambda n: set_to.append(n))
    host = Host(8)
    gov = threads.ThreadGovernor(True, interval=1.0, read=host.read, cpus={0, 1}, clock=lambda: host.t)
    assert gov.enabled and gov.threads == 2 and gov.cores == 2
    return gov, host, set_to


def test_dedicated_cores_on_a_busy_host_never_yield(governor):
    gov, host, set_to = governor
    rest = {cpu: 1.0 for cpu in range(2, 8)}                   # CPUs 2..7: another job, 100 % busy
    for step in range(50):
        host.second(gov, step, {0: 1.0, 1: 0.95}, {**rest, 0: 0.05})
    assert gov.threads == 2 and gov.switches == [] and set_to == []
    gov.close()
    assert set_to == []


def test_shared_cores_yield_and_come_back(governor):
    gov, host, set_to = governor
    rest = {cpu: 1.0 for cpu in range(2, 8)}
    for step in range(10):                                     # alone on its cores
        host.second(gov, step, {0: 1.0, 1: 1.0}, rest)
    assert gov.threads == 2 and gov.switches == []
    host.second(gov, 10, {0: 0.0, 1: 1.0}, {**rest, 0: 1.0})    # another process on CPU 0: one reading is not enough
    assert gov.threads == 2
    host.second(gov, 11, {0: 0.0, 1: 1.0}, {**rest, 0: 1.0})
    assert gov.threads == 1 and set_to == [1] and gov.switches == [(11, 1)]
    for step in range(12, 15):                                 # it stays while the other process runs
        host.second(gov, step, {1: 1.0}, {**rest, 0: 1.0})
    assert gov.threads == 1
    host.second(gov, 15, {1: 1.0}, rest)
    assert gov.threads == 1                                    # one quiet reading is not enough either
    host.second(gov, 16, {1: 1.0}, rest)
    assert gov.threads == 2 and set_to == [1, 2] and gov.switches == [(11, 1), (16, 2)]
    gov.check(17)                                              # within the interval: no reading
    assert len(gov.switches) == 2
    for step in range(18, 20):                                 # back again; close gives all threads back
        host.second(gov, step, {1: 1.0}, {**rest, 0: 1.0})
    assert gov.threads == 1
    gov.close()
    assert gov.threads == 2 and set_to == [1, 2, 1, 2]


def test_a_governor_that_is_off_or_cannot_read_changes_nothing(monkeypatch):
    monkeypatch.setattr(threads.torch, "get_num_threads", lambda: 2)
    assert not threads.ThreadGovernor(False).enabled           # train.threads=N or torchrun: never governed
    gov = threads.ThreadGovernor(True, read=lambda: None, cpus={0, 1})
    assert not gov.enabled
    gov.check(1)
    gov.close()
    assert gov.threads == 2 and gov.switches == []
