"""Several processes on the CPU (DistributedDataParallel over gloo, no network): K processes train exactly what one
process trains with the same global batch, gradient accumulation gives the full-batch update, a run resumes on
another number of processes, a failure or a signal on one rank stops every rank, and torchrun sampling draws the
images one process draws.

How equal is "equal": with SGD every parameter agrees to 1e-5 relative. With AdamW (the default) the parameters as
one vector agree to 1e-5 relative (measured ~1e-6), but single elements whose gradient is a cancellation down to
rounding noise (the per-token time modulation) differ by up to ~1e-5 absolute, because Adam divides the gradient
by its own running magnitude: any change of summation order does that. A real mistake (rank 1 drawing its own
timesteps and noise) gives ~5e-3, 400x the tolerance.
"""
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import traceback

import numpy as np
import pytest
import torch

from hybvit import checkpoint as ckpt
from hybvit.config import Config
from hybvit.data import to_uint8
from hybvit.datasets import load_data
from hybvit.errors import HybvitError
from hybvit.sample import draw_samples, load_run
from hybvit.data import check_batch_split
from hybvit.train import train

STEPS = 5
TIMEOUT = 90  # seconds for a group of processes; reaching it means a deadlock


def flat(state: dict) -> torch.Tensor:
    return torch.cat([v.flatten().double() for v in state.values()])


def rel_diff(a: dict, b: dict) -> float:
    """|a - b| / |b| over all parameters taken as one vector."""
    fa, fb = flat(a), flat(b)
    return ((fa - fb).norm() / fb.norm()).item()


def weights(run_dir) -> dict:
    return ckpt.load_training_state(run_dir / "checkpoints" / "last.pt")


def assert_same_training(a: dict, b: dict, elementwise: bool = False) -> None:
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        assert rel_diff(a[part], b[part]) < 1e-5, (part, rel_diff(a[part], b[part]))
        assert (flat(a[part]) - flat(b[part])).abs().max() < 1e-4, part
        if elementwise:
            for k in a[part]:
                assert torch.allclose(a[part][k], b[part][k], rtol=1e-5, atol=1e-7), (part, k)


# ----------------------------------------------------------------------------- the spawned ranks

def _rank_main(rank: int, world: int, jobs: list, result_dir: str) -> None:
    """One rank: init gloo, run each job (a train() call, possibly with a fault injected), record the outcome.
    The ranks meet through a file in result_dir rather than a TCP port that the parent found free (another process
    could take it first). They end with distributed.shutdown(), which the CLI also calls: before it had a barrier,
    rank 1 sometimes aborted in its teardown after all its jobs were done (exit code -6), failing the fixture."""
    os.environ["HYBVIT_NO_DOWNLOAD"] = "1"
    torch.set_num_threads(1)
    import torch.distributed as dist

    import hybvit.budget
    import hybvit.checkpoint
    import hybvit.distributed
    import hybvit.evaluate.end_of_run
    store = os.path.join(result_dir, "rendezvous")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    data = load_data("digits")
    results = {}
    save_state, lr_at = hybvit.checkpoint.save_training_state, hybvit.budget.lr_at
    eval_samples = hybvit.evaluate.end_of_run.EVAL_SAMPLES
    for job in jobs:
        hybvit.checkpoint.save_training_state, hybvit.budget.lr_at = save_state, lr_at
        hybvit.evaluate.end_of_run.EVAL_SAMPLES = job.get("eval_samples", eval_samples)   # small-fd while training
        if job.get("fault") == "rank0-write-fails" and rank == 0:
            def failing_save(path, state):
                raise OSError("disk full (injected)")
            hybvit.checkpoint.save_training_state = failing_save
        if job.get("fault") == "sigterm-rank1" and rank == 1:     # SIGTERM to rank 1 alone, during step 3
            def signalling_lr_at(step, *args):
                if step == 2:
                    os.kill(os.getpid(), signal.SIGTERM)
                return lr_at(step, *args)
            hybvit.budget.lr_at = signalling_lr_at
        try:
            if "map_batches" in job:                              # shared batch loops (map_batches, below)
                results[job["name"]] = {"ok": _shared_loop(rank, world, job["map_batches"])}
                continue
            out = train(Config.from_dict(job["cfg"]), data, job["out"], resume=job.get("resume", False),
                        stop_after=job.get("stop_after"), progress=False)
            results[job["name"]] = {"ok": out}
        except BaseException as e:  # noqa: BLE001 - recorded for the test to judge
            results[job["name"]] = {"error": type(e).__name__, "message": str(e),
                                    "trace": traceback.format_exc()[-2000:]}
    with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f, default=str)
    hybvit.distributed.shutdown()


def _shared_loop(rank: int, world: int, fault: dict) -> list:
    """As `hybvit evaluate` runs: one all_ok around two map_batches loops (7 items in batches of 2) inside
    shared_work. fault {"batch": k}: batch k raises on the rank that runs it; {"between": r}: rank r raises between
    the two loops, while the other ranks already wait in the second."""
    import hybvit.distributed as d
    ctx = d.context()

    def fn(start, stop):
        if start // 2 == fault.get("batch"):
            raise HybvitError(f"batch {start // 2} cannot be read (injected on rank {rank})")
        if fault.get("all") == "same":
            raise HybvitError("no batch can be read (injected everywhere)")
        if fault.get("all") == "own":
            raise HybvitError(f"no batch can be read (injected on rank {rank})")
        return [start, stop, rank]

    def both_loops():
        first = d.map_batches(7, 2, fn)
        if rank == fault.get("between"):
            raise HybvitError(f"no plot written (injected on rank {rank})")
        return first + d.map_batches(7, 2, fn)
    with d.shared_work(ctx):
        return d.all_ok(ctx, both_loops)


def run_ranks(world: int, jobs: list, result_dir) -> list[dict]:
    """Start `world` ranks, wait (a deadlock fails the test instead of hanging it), return each rank's results."""
    mp = multiprocessing.get_context("spawn")
    procs = [mp.Process(target=_rank_main, args=(r, world, jobs, str(result_dir))) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(TIMEOUT)
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert not hung, f"ranks {hung} still running after {TIMEOUT} s: deadlock"
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return [json.loads((result_dir / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.fixture(scope="module")
def digits():
    return load_data("digits")


@pytest.fixture(scope="module")
def cfgs():
    """The tiny digits config of conftest (hybvit, global batch 32) with augmentation on, so that the crop, flip
    and CutMix/Mixup draws are part of what must match; plus its SGD twin."""
    from hybvit.config import preset_config
    cfg = preset_config("digits-hybvit")
    cfg.model.dim, cfg.model.depth, cfg.model.heads = 32, 2, 2
    t = cfg.train
    t.steps, t.batch_size, t.fd_samples, t.ckpt_every = STEPS, 32, 0, 1000
    t.device, t.amp = "cpu", "fp32"   # equality across process counts is an exact-arithmetic promise: fp32
    cfg.data.crop_padding, cfg.data.hflip, cfg.data.mix_prob = 1, True, 0.5
    sgd = Config.from_dict(cfg.to_dict())
    sgd.train.optimizer, sgd.train.lr = "sgd", 0.05
    return {"adamw": cfg, "sgd": sgd}


@pytest.fixture(scope="module")
def two_ranks(cfgs, tmp_path_factory):
    """One group of 2 ranks runs every 2-process scenario in turn; returns the run root and both ranks' results."""
    root = tmp_path_factory.mktemp("ddp")
    adamw, sgd = cfgs["adamw"].to_dict(), cfgs["sgd"].to_dict()
    sgd["train"].update(eval_every="2", keep_every="2")   # rank 0 evaluates (8 samples, below) while rank 1 waits
    nan = Config.from_dict(adamw)
    nan.train.alpha, nan.train.ckpt_every = 1e39, 1          # alpha * L_simple overflows fp32: an inf loss
    ckpt2 = Config.from_dict(adamw)
    ckpt2.train.ckpt_every = 2
    jobs = [
        {"name": "adamw", "cfg": adamw, "out": str(root / "adamw")},
        {"name": "sgd", "cfg": sgd, "out": str(root / "sgd"), "eval_samples": 8},
        {"name": "stopped", "cfg": adamw, "out": str(root / "stopped"), "stop_after": 3},
        {"name": "sigterm", "cfg": adamw, "out": str(root / "sigterm"), "fault": "sigterm-rank1"},
        {"name": "write-fails", "cfg": ckpt2.to_dict(), "out": str(root / "write-fails"), "fault": "rank0-write-fails"},
        {"name": "nan", "cfg": nan.to_dict(), "out": str(root / "nan")},
        {"name": "map-batches", "map_batches": {}},                            # nothing fails
        {"name": "map-batches-fails", "map_batches": {"batch": 3}},            # batch 3 runs on rank 1 and raises
        {"name": "map-batches-between", "map_batches": {"between": 0}},        # rank 0 fails outside a loop
        {"name": "map-batches-all-same", "map_batches": {"all": "same"}},      # every rank, one message
        {"name": "map-batches-all-own", "map_batches": {"all": "own"}},        # every rank, its own message
    ]
    return root, run_ranks(2, jobs, root)


@pytest.fixture(scope="module")
def one_rank(cfgs, digits, tmp_path_factory):
    """The single-process references: AdamW and SGD, each with grad_accum 1 and 2 (recording the size of every
    piece of a batch the network was given, in PIECES)."""
    import hybvit.train
    root = tmp_path_factory.mktemp("single")
    shard = hybvit.train.shard

    def recording_shard(tensors, index, parts):
        piece = shard(tensors, index, parts)
        PIECES.setdefault(current, []).append(None if piece is None else len(piece[0]))
        return piece
    hybvit.train.shard = recording_shard
    try:
        for name, cfg in cfgs.items():
            for accum in (1, 2):
                c = Config.from_dict(cfg.to_dict())
                c.train.grad_accum = accum
                current = f"{name}-accum{accum}"
                train(c, digits, root / current, progress=False)
    finally:
        hybvit.train.shard = shard
    return root


PIECES: dict[str, list] = {}


# ----------------------------------------------------------------------------- tests

def test_two_processes_train_what_one_process_trains(two_ranks, one_rank):
    root, results = two_ranks
    for rank, res in enumerate(results):
        assert "ok" in res["adamw"], res["adamw"]
        assert res["adamw"]["ok"]["steps"] == STEPS
    metrics = results[0]["adamw"]["ok"]
    assert metrics["processes"] == 2 and metrics["images_seen"] == STEPS * 64   # the global batch, both branches
    assert results[1]["adamw"]["ok"] == {"steps": STEPS, "rank": 1}               # rank 1 writes nothing
    assert_same_training(weights(root / "adamw"), weights(one_rank / "adamw-accum1"))
    assert_same_training(weights(root / "sgd"), weights(one_rank / "sgd-accum1"), elementwise=True)
    # evaluation while training and snapshots under two processes: by rank 0, without changing the training
    rows = [json.loads(line) for line in (root / "sgd" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval/small_fd" in r] == [2, 4]
    assert sorted(p.name for p in (root / "sgd" / "checkpoints").glob("ema-*")) == \
        ["ema-0000002.safetensors", "ema-0000004.safetensors"]
    # the checkpoint holds the bare model: single-process tools load it
    assert not any(k.startswith("module.") for k in weights(root / "adamw")["model"])
    assert load_run(root / "adamw", device="cpu").sample(2, steps=2).shape == (2, 1, 8, 8)


def test_grad_accum_gives_the_full_batch_update(one_rank):
    assert_same_training(weights(one_rank / "adamw-accum2"), weights(one_rank / "adamw-accum1"))
    assert_same_training(weights(one_rank / "sgd-accum2"), weights(one_rank / "sgd-accum1"), elementwise=True)
    # not vacuous: with grad_accum 2 the network saw pieces of 16 images, two per branch and step
    assert PIECES["adamw-accum1"] == [32] * (2 * STEPS) and PIECES["adamw-accum2"] == [16] * (4 * STEPS)
    assert json.loads((one_rank / "sgd-accum2" / "metrics.json").read_text())["grad_accum"] == 2


def test_two_process_run_resumes_on_one_process(two_ranks, one_rank, cfgs, digits):
    root, results = two_ranks
    assert all(r["stopped"]["ok"] == {"steps": 3, "interrupted": True, "stopped_after": True} for r in results)
    stopped = weights(root / "stopped")
    assert stopped["step"] == 3 and stopped["processes"] == 2
    reference = weights(one_rank / "adamw-accum1")
    assert rel_diff(stopped["model"], reference["model"]) > 1e-3        # 3 of 5 steps: really unfinished
    metrics = train(cfgs["adamw"], digits, root / "stopped", resume=True, progress=False)
    assert metrics["steps"] == STEPS and metrics["processes"] == 1
    assert_same_training(weights(root / "stopped"), reference)


def test_sigterm_on_one_rank_stops_all_ranks_with_a_checkpoint(two_ranks):
    root, results = two_ranks
    assert [r["sigterm"].get("ok") for r in results] == [{"steps": 3, "interrupted": True, "stopped_after": False}] * 2, \
        results
    assert weights(root / "sigterm")["step"] == 3


def test_failure_on_rank_zero_stops_every_rank(two_ranks):
    root, results = two_ranks
    rank0, rank1 = results[0]["write-fails"], results[1]["write-fails"]
    assert rank0.get("error") == "OSError" and "injected" in rank0["message"], rank0
    assert rank1.get("error") == "CollectiveError" and "rank 0 failed" in rank1["message"], rank1
    assert not (root / "write-fails" / "checkpoints" / "last.pt").exists()
    # a NaN is seen by all ranks together: rank 0 reports it, rank 1 stops quietly
    nan0, nan1 = results[0]["nan"], results[1]["nan"]
    assert nan0.get("error") == "HybvitError" and "non-finite" in nan0["message"], nan0
    assert nan1.get("error") == "CollectiveError", nan1


def test_shared_batch_loop_gathers_in_order_and_stops_every_rank_on_a_failure(two_ranks):
    """Over a real gloo group: every rank receives every batch's result in batch order (batch k from rank k mod 2).
    A batch that raises on rank 1, or rank 0 failing between two loops while rank 1 waits in the second, gives the
    failing rank its own error and the other CollectiveError naming it; none waits on a collective that will not
    come (a deadlock fails run_ranks)."""
    _, results = two_ranks
    expected = [[0, 2, 0], [2, 4, 1], [4, 6, 0], [6, 7, 1]] * 2
    assert [r["map-batches"].get("ok") for r in results] == [expected, expected], results
    rank0, rank1 = results[0]["map-batches-fails"], results[1]["map-batches-fails"]
    assert rank1.get("error") == "HybvitError" and "batch 3 cannot be read (injected on rank 1)" in rank1["message"]
    assert rank0.get("error") == "CollectiveError" and "rank 1 failed" in rank0["message"], rank0
    rank0, rank1 = results[0]["map-batches-between"], results[1]["map-batches-between"]
    assert rank0.get("error") == "HybvitError" and "no plot written (injected on rank 0)" in rank0["message"]
    assert rank1.get("error") == "CollectiveError" and "rank 0 failed" in rank1["message"], rank1
    # every rank failing: rank 0's error once (the command line prints no CollectiveError), a different one kept
    same0, same1 = results[0]["map-batches-all-same"], results[1]["map-batches-all-same"]
    assert same0.get("error") == "HybvitError" and "injected everywhere" in same0["message"], same0
    assert same1.get("error") == "CollectiveError" and "injected everywhere" in same1["message"], same1
    own0, own1 = results[0]["map-batches-all-own"], results[1]["map-batches-all-own"]
    assert [own0.get("error"), own1.get("error")] == ["HybvitError"] * 2 and "on rank 1" in own1["message"], own1


def test_global_batch_must_split_into_processes_and_micro_batches(cfgs, digits, tmp_path):
    cfg = Config.from_dict(cfgs["adamw"].to_dict())
    cfg.train.batch_size, cfg.train.grad_accum = 30, 2
    check_batch_split(cfg, len(digits.x_train), world=1)                  # 30 = 2 x 15: fine on one process
    with pytest.raises(HybvitError, match=r"global batch of 30 .* 2 process\(es\) x train.grad_accum 2; use a "
                                          r"multiple of 4, e.g. --set train.batch_size=32"):
        check_batch_split(cfg, len(digits.x_train), world=2)
    cfg.train.batch_size, cfg.train.grad_accum = 32, 3
    with pytest.raises(HybvitError, match="multiple of 3"):
        train(cfg, digits, tmp_path / "r", progress=False)
    assert not (tmp_path / "r").exists()


def _torchrun(*args, timeout=TIMEOUT) -> subprocess.CompletedProcess:
    """torchrun --nproc_per_node=2 -m hybvit ARGS (a `--` in ARGS ends torchrun's own options: its parser takes
    `--run` and `--num` for abbreviations of its --run-path and --numa-binding)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "hybvit", *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS="1", HYBVIT_NO_DOWNLOAD="1")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)


TINY = ["--set", "model.dim=32", "--set", "model.depth=2", "--set", "model.heads=2", "--set", "fd_samples=0",
        "--set", "train.device=cpu", "--quiet"]


def test_torchrun_train_and_sample(tmp_path):
    # a global batch that does not split: one error line (rank 0), exit status 2, no run directory
    bad = _torchrun("train", "--steps", 2, "--out", tmp_path / "bad", "--set", "batch_size=31", *TINY)
    assert bad.returncode != 0
    lines = [ln for ln in bad.stderr.splitlines() if ln.startswith("hybvit: error")]
    assert len(lines) == 1 and "multiple of 2" in lines[0], bad.stderr
    assert not (tmp_path / "bad").exists()

    # two processes on a prepared folder (each maps it) train what one process trains on the in-memory digits
    from hybvit.cli import main
    assert main(["prepare", "digits", "--out", str(tmp_path / "prepared")]) == 0
    run = tmp_path / "run"
    done = _torchrun("train", "--steps", 2, "--out", run, "--set", "batch_size=16", "--set", "amp=fp32",
                     "--data", f"prepared:{tmp_path / 'prepared'}", *TINY)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("test accuracy") == 1                       # rank 0 alone evaluates and prints
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["steps"] == 2 and (run / "samples.png").exists()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", *map(str, ["--steps", 2, "--out", tmp_path / "one", "--set", "batch_size=16",
                                         "--set", "amp=fp32", *TINY])]) == 0
    finally:
        torch.set_num_threads(threads)
    assert_same_training(weights(run), weights(tmp_path / "one"))

    # 7 samples in batches of 2: rank 0 draws batches 0 and 2, rank 1 batches 1 and 3 (the last one of 1 image)
    sampled = _torchrun("--", "sample", "--run", run, "--num", 7, "--batch-size", 2, "--steps", 3, "--seed", 5,
                        "--device", "cpu", "--out", tmp_path / "s.npz")      # gloo on the CPU, also on a GPU box
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    images = np.load(tmp_path / "s.npz")["arr_0"]
    one = load_run(run, device="cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                                             # as each torchrun process
    try:
        expected = to_uint8(draw_samples(one.model, one.diffusion, 7, steps=3, seed=5, batch_size=2,
                                         amp=one.config.train.amp))
    finally:
        torch.set_num_threads(threads)
    expected = expected.permute(0, 2, 3, 1)
    assert images.shape == (7, 8, 8, 1) and np.array_equal(images, expected.numpy())
    # and the interleaving matters: the images are not one batch repeated
    assert not np.array_equal(images[0], images[2])


EVAL_FLAGS = ["--metrics", "accuracy,ece,bpd,ood,pgd,small-fd,pixel-fd", "--num-samples", 9, "--batch-size", 4,
              "--steps", 3, "--bpd-images", 10, "--bpd-timesteps", 5, "--ood", "noise,interp", "--ood-images", 12,
              "--pgd-images", 10, "--pgd-steps", 2, "--pgd-norms", "linf", "--pgd-eps-linf", "8", "--device", "cpu",
              "--no-html", "--quiet"]
UNSHARED = {"plots", "plots_dir", "seconds", "provenance", "training_curves"}   # files, timings, the machine


def same_report(a, b, path="") -> None:
    """Two reports agree: the same keys, strings and counts, and numbers to float rounding."""
    if isinstance(a, dict):
        keys = set(a) - UNSHARED
        assert keys == set(b) - UNSHARED, path
        for k in keys:
            same_report(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (u, v) in enumerate(zip(a, b)):
            same_report(u, v, f"{path}[{i}]")
    elif isinstance(a, float):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-6), (path, a, b)
    else:
        assert a == b, (path, a, b)


def test_torchrun_evaluate_splits_the_work_and_reports_what_one_process_reports(tmp_path, capsys):
    """`hybvit evaluate` under torchrun: sampling, classification, features, bits/dim, OOD scores and PGD split
    their batches over two processes (map_batches, below), and rank 0's report equals one process's."""
    from hybvit.cli import main
    run = tmp_path / "run"
    assert main(["train", *map(str, ["--steps", 2, "--out", run, "--set", "batch_size=16", *TINY])]) == 0
    two = _torchrun("--", "evaluate", "--run", run, *EVAL_FLAGS, "--out", tmp_path / "two.json")
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("report ->") == 1 and "(2 processes)" in two.stdout      # rank 0 alone reports
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                                             # as each torchrun process
    try:
        assert main(["evaluate", "--run", str(run), *map(str, EVAL_FLAGS), "--out", str(tmp_path / "one.json")]) == 0
    finally:
        torch.set_num_threads(threads)
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert one["provenance"]["processes"] == 1 and two["provenance"]["processes"] == 2
    assert set(one["metrics"]) == {"accuracy", "ece", "bpd", "ood", "pgd", "small-fd", "pixel-fd"}
    same_report(one["metrics"], two["metrics"])
    # an error of every rank (a missing OOD folder): one line in all, no report, a non-zero exit
    bad = _torchrun("--", "evaluate", "--run", run, "--metrics", "accuracy,ood", "--ood", f"folder:{tmp_path / 'no'}",
                    "--out", tmp_path / "bad.json")
    lines = [line for line in bad.stderr.splitlines() if line.startswith("hybvit: error")]
    assert bad.returncode != 0 and len(lines) == 1 and "does not exist" in lines[0], bad.stderr[-3000:]
    assert not (tmp_path / "bad.json").exists()


def test_map_batches_splits_over_the_ranks_and_gathers_in_order(monkeypatch):
    """Inside shared_work, rank r runs batches r, r + K, ... and every rank receives all results in batch order;
    outside it (or on one process) every batch runs here."""
    import hybvit.distributed as d
    calls = []
    assert d.map_batches(7, 2, lambda a, b: (calls.append(a), (a, b))[1]) == [(0, 2), (2, 4), (4, 6), (6, 7)]
    assert calls == [0, 2, 4, 6]
    world = 3
    results = {r: [(s, min(s + 2, 7)) for k, s in enumerate(range(0, 7, 2)) if k % world == r] for r in range(world)}

    def all_gather_object(out, mine, group=None):
        assert mine == results[1]                                       # this process is rank 1: batches 1 of 4
        out[:] = [results[r] for r in range(world)]
    monkeypatch.setattr(d.dist, "all_gather_object", all_gather_object)
    monkeypatch.setattr(d, "all_ok", lambda ctx, fn, only_main=False: fn())   # no group: the agreement is elsewhere
    calls.clear()
    with d.shared_work(d.Context(rank=1, world=world)):
        got = d.map_batches(7, 2, lambda a, b: (calls.append(a), (a, b))[1])
    assert calls == [2] and got == [(0, 2), (2, 4), (4, 6), (6, 7)]
    assert d.my_batches(4) == [0, 1, 2, 3]                              # outside shared_work again


@pytest.mark.parametrize("world", [2, 3, 5])
def test_gathered_shares_are_in_the_one_process_order(world, monkeypatch):
    """gather_samples puts the shares of draw_samples(shard=(r, K)) back in batch order, whatever K (5 ranks for
    3 batches: two ranks draw nothing)."""
    import hybvit.distributed
    from hybvit.data import to_float
    from hybvit.sample import gather_samples
    x = to_float(torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8))      # batches of 2: sizes 2, 2, 1
    batches = list(x.split(2))
    shares = [torch.cat([b for k, b in enumerate(batches) if k % world == r] or [x[:0]]) for r in range(world)]
    monkeypatch.setattr(hybvit.distributed, "gather", lambda ctx, obj: [to_uint8(s) for s in shares])
    assert torch.equal(gather_samples(None, x[:0], 5, 2), to_uint8(x))


def test_checkpoints_hold_the_bare_model_state():
    """Wrappers (DistributedDataParallel's `module.`, torch.compile's `_orig_mod.`) never reach a checkpoint."""
    lin = torch.nn.Linear(2, 3)
    assert set(ckpt.plain_state_dict(torch.compile(lin))) == {"weight", "bias"}
    wrapped = {f"module._orig_mod.{k}": v for k, v in lin.state_dict().items()}
    assert set(ckpt.plain_state_dict(wrapped)) == {"weight", "bias"}
    mixed = {"module.weight": lin.weight, "bias": lin.bias}                   # not a wrapper's: left alone
    assert set(ckpt.plain_state_dict(mixed)) == {"module.weight", "bias"}
