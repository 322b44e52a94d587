"""Stopping a run from outside: SIGTERM is always graceful (a checkpoint, then exit status 75), however many
arrive, as `timeout`, Slurm and torchrun send one to every process of a group; the run resumes from it."""
import os
import signal
import subprocess
import sys
import time

import torch

from hybvit.cli import EXIT_STOPPED, main

TINY = ["--set", "model.dim=32", "--set", "model.depth=2", "--set", "model.heads=2", "--set", "fd_samples=0",
        "--set", "num_samples=0", "--set", "batch_size=32"]


def test_two_sigterms_to_the_process_group_leave_a_resumable_run(tmp_path):
    out = tmp_path / "run"
    last = out / "checkpoints" / "last.pt"
    proc = subprocess.Popen([sys.executable, "-m", "hybvit", "train", "--steps", "100000", "--out", str(out),
                             "--quiet", *TINY], start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not last.exists() and time.time() < deadline and proc.poll() is None:   # the step-0 checkpoint
            time.sleep(0.2)
        assert last.exists(), proc.communicate()
        assert torch.load(last, weights_only=True)["step"] == 0        # resumable from the moment it exists
        time.sleep(2.0)                                               # a few steps
        for delay in (0.0, 0.05, 0.1, 0.2, 0.4):                    # more arrive while it stops and exits
            time.sleep(delay)
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                break
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    stdout, stderr = proc.communicate()
    assert rc == EXIT_STOPPED, stderr.decode()
    step = torch.load(last, weights_only=True)["step"]
    assert step >= 1 and b"stopped at step" in stdout
    assert main(["train", "--resume", str(out), "--steps", str(step + 2), "--quiet"]) == 0
    assert torch.load(last, weights_only=True)["step"] == step + 2 and (out / "metrics.json").exists()


def test_thread_governor_gives_up_the_cores_others_take(monkeypatch):
    """Fed readings of the machine's CPU time: alone it never changes the threads; another process using a core
    for two readings drops training to the cores left; two idle readings give all threads back."""
    import hybvit.threads as threads
    torch_threads = []
    monkeypatch.setattr(threads.torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(threads.torch, "set_num_threads", lambda n: torch_threads.append(n))
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 2)
    clock = {"t": 0.0, "busy": 0, "own": 0}
    monkeypatch.setattr(threads.time, "monotonic", lambda: clock["t"])
    monkeypatch.setattr(threads, "cpu_ticks", lambda: (clock["busy"], clock["own"]))
    tick = 100
    monkeypatch.setattr(threads.os, "sysconf", lambda name: tick)
    gov = threads.ThreadGovernor(True)
    assert gov.enabled and gov.threads == 2

    def second(own_cores: float, other_cores: float, step: int) -> None:
        clock["t"] += 1.0
        clock["own"] += int(own_cores * tick)
        clock["busy"] += int((own_cores + other_cores) * tick)
        gov.check(step)
    for step in range(10):                                   # alone (a little noise from the system)
        second(2.0, 0.1, step)
    assert gov.threads == 2 and gov.switches == [] and torch_threads == []
    second(1.0, 1.0, 10)                                     # a second job: one reading is not enough
    assert gov.threads == 2
    second(1.0, 1.0, 11)
    assert gov.threads == 1 and torch_threads == [1] and gov.switches == [(11, 1)]
    for step in range(12, 15):                               # it stays while the other job runs
        second(1.0, 1.0, step)
    assert gov.threads == 1
    second(1.0, 0.0, 15)
    second(1.0, 0.0, 16)                                     # gone: all threads again
    assert gov.threads == 2 and gov.switches == [(11, 1), (16, 2)]
    gov.check(17)                                            # within the interval: no reading
    assert len(gov.switches) == 2
    assert not threads.ThreadGovernor(False).enabled          # train.threads=N or torchrun: never governed
