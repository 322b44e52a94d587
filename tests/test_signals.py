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
        "--set", "batch_size=32"]


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

