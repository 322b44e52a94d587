"""What one process of a multi-process run holds and does: memory per process on a prepared dataset against the
in-memory path, and the input pipeline's time per process when K processes share a step's batch.

    python benchmarks/multi_process.py memory  [--gb 2] [--dir /tmp]   # 1 and 2 processes, prepared vs npz
    python benchmarks/multi_process.py augment [--batch 256] [--steps 20]   # K = 1, 2, 4 simulated processes

memory: makes a dataset of about --gb GB of random 64x64x3 uint8 images once as an uncompressed npz (read into each
process's memory, the in-memory path) and as a prepared folder (`hybvit prepare`, mapped read-only); then 1 or 2
processes at once each load it, touch every training image (what an epoch does), wait for each other and read
/proc/self/smaps_rollup: Pss (proportional set size, which counts a page shared by n processes as 1/n), its
anonymous and file parts, and Anonymous (private memory). Prints a markdown table.

augment: the full CIFAR-10 recipe (`cifar10-hybvit`: crop, flip, AutoAugment, erasing, CutMix/Mixup, the diffusion
batch's timesteps and noise) of a global batch of --batch images; each of K simulated processes builds its own
share (objective.batch_inputs with share=(rank, K)) in this one process, one thread, one after the other. Prints the
mean time per step of one process's share for K = 1, 2, 4, and its ratio to K = 1.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

FIELDS = ("Rss", "Pss", "Pss_Anon", "Pss_File", "Anonymous")


def smaps() -> dict[str, float]:
    """This process's memory from /proc/self/smaps_rollup, in MiB."""
    out = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in FIELDS:
            out[key] = int(rest.split()[0]) / 1024
    return out


def _hold(spec: str, barrier, queue) -> None:
    from hybvit.datasets import load_data
    torch.set_num_threads(1)
    data = load_data(spec)
    x = data.x_train
    total = 0
    for i in range(0, len(x), 4096):                   # touch every training image, as an epoch does
        total += int(x[i:i + 4096].sum())
    barrier.wait()                                     # every process holds its data now
    queue.put(smaps())
    barrier.wait()


def memory(args) -> None:
    from hybvit.data import ImageData
    from hybvit.prepared import write_prepared
    root = Path(tempfile.mkdtemp(dir=args.dir, prefix="hybvit-mem-"))
    n = int(args.gb * 2 ** 30 / (3 * 64 * 64))
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)
    y = rng.integers(0, 10, n)
    np.savez(root / "data.npz", x_train=x, y_train=y, x_test=x[:100], y_test=y[:100])
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    del x
    write_prepared(ImageData(xt, torch.from_numpy(y), xt[:100], torch.from_numpy(y[:100]), 10, "npz"),
                   root / "prepared")
    del xt
    print(f"{n:,} training images of 64x64x3 ({n * 3 * 64 * 64 / 2 ** 30:.2f} GiB) in {root}\n")
    print("| path | processes | Rss | Pss | Pss anon | Pss file | Anonymous | Pss summed over processes |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    ctx = mp.get_context("spawn")
    for name, spec in (("in memory (npz)", f"npz:{root / 'data.npz'}"), ("prepared", f"prepared:{root / 'prepared'}")):
        for k in (1, 2):
            barrier, queue = ctx.Barrier(k), ctx.Queue()
            procs = [ctx.Process(target=_hold, args=(spec, barrier, queue)) for _ in range(k)]
            for p in procs:
                p.start()
            rows = [queue.get() for _ in range(k)]
            for p in procs:
                p.join()
            m = {f: sum(r[f] for r in rows) / k for f in FIELDS}
            print(f"| {name} | {k} | " + " | ".join(f"{m[f]:,.0f}" for f in FIELDS)
                  + f" | {sum(r['Pss'] for r in rows):,.0f} |")
    print("\n(MiB per process, the mean over the processes)")
    for f in root.rglob("*"):
        if f.is_file():
            f.unlink()
    (root / "prepared").rmdir()
    root.rmdir()


def augment(args) -> None:
    from hybvit.config import preset_config
    from hybvit.data import Batches
    from hybvit.diffusion import GaussianDiffusion
    from hybvit.objective import batch_inputs
    torch.set_num_threads(1)
    cfg = preset_config("cifar10-hybvit")
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (10_000, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (10_000,), generator=g)
    diffusion = GaussianDiffusion.from_config(cfg.diffusion)
    ce, dif = Batches(len(x), args.batch, 0, 0), Batches(len(x), args.batch, 0, 1)
    base = None
    print(f"global batch {args.batch}, {args.steps} steps, 1 thread\n")
    print("| K processes | ms per step, one process's share | ratio to K = 1 |")
    print("|---:|---:|---:|")
    for k in (1, 2, 4):
        batch_inputs(cfg, 0, x, y, torch.device("cpu"), ce, dif, diffusion, share=(0, k))       # warm-up
        t0 = time.perf_counter()
        for step in range(args.steps):
            for r in range(k):
                batch_inputs(cfg, step, x, y, torch.device("cpu"), ce, dif, diffusion, share=(r, k))
        per = (time.perf_counter() - t0) / (args.steps * k) * 1000
        base = base or per
        print(f"| {k} | {per:.1f} | {per / base:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("part", choices=("memory", "augment"))
    ap.add_argument("--gb", type=float, default=2.0, help="memory: the training set's size in GB")
    ap.add_argument("--dir", default=None, help="memory: where to write the dataset (default: the temp folder)")
    ap.add_argument("--batch", type=int, default=256, help="augment: the global batch")
    ap.add_argument("--steps", type=int, default=20, help="augment: steps timed per K")
    args = ap.parse_args()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d')}")
    memory(args) if args.part == "memory" else augment(args)


if __name__ == "__main__":
    main()
