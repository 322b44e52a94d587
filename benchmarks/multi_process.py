"""What one process of a multi-process run holds and does: memory per process on a prepared dataset against the
in-memory path, and the input pipeline's time per process when K processes share a step's batch.

    python benchmarks/multi_process.py memory  [--gb 2] [--dir /tmp]   # 1 and 2 processes, prepared vs npz
    python benchmarks/multi_process.py augment [--batch 256] [--steps 20]   # K = 1, 2, 4 simulated processes
    python benchmarks/multi_process.py prepare [--images 20000]              # peak memory of preparing a folder

memory: makes a dataset of about --gb GB of random 64x64x3 uint8 images once as an uncompressed npz (read into each
process's memory, the in-memory path) and as a prepared folder (`hybvit prepare`, mapped read-only); then 1 or 2
processes at once each load it, touch every training image (what an epoch does), wait for each other and read
/proc/self/smaps_rollup: Pss (proportional set size, which counts a page shared by n processes as 1/n), its
anonymous and file parts, and Anonymous (private memory). Prints a markdown table.

augment: the full CIFAR-10 recipe (`cifar10-hybvit`: crop, flip, AutoAugment, erasing, CutMix/Mixup, the diffusion
batch's timesteps and noise) of a global batch of --batch images; each of K simulated processes builds its own
share (objective.batch_inputs with share=(rank, K)) in this one process, one thread, one after the other. Prints the
mean time per step of one process's share for K = 1, 2, 4, and its ratio to K = 1.

prepare: writes a folder of --images random 64x64 RGB PNGs (two classes, a tenth of them as the test split), then
measures the peak anonymous memory (RssAnon: what the process needs for itself; mapped file pages are RssFile,
which the page cache can write back and drop) of a fresh process that runs `hybvit prepare folder:...` (decoding
straight into the mapped arrays) and of one that decodes the folder into memory, against the decoded size.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import shutil
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


def _peak_mib(code: str) -> tuple[float, float]:
    """Peak anonymous and file-backed resident memory (MiB: RssAnon, RssFile of /proc/PID/status, read every 20
    ms) of a fresh Python process running code. Pages of a mapped file count as RssFile: the page cache can write
    them back and drop them, so only RssAnon is memory the process needs for itself."""
    import subprocess
    import sys
    proc = subprocess.Popen([sys.executable, "-c", code])
    peak = {"RssAnon": 0, "RssFile": 0}
    while proc.poll() is None:
        try:
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in peak:
                    peak[key] = max(peak[key], int(value.split()[0]))
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    if proc.returncode:
        raise SystemExit(f"the measured process failed (exit {proc.returncode})")
    return peak["RssAnon"] / 1024, peak["RssFile"] / 1024


def prepare(args) -> None:
    from PIL import Image
    work = Path(tempfile.mkdtemp(prefix="hybvit-prep-", dir=args.dir))
    rng = np.random.default_rng(0)
    for i in range(args.images):
        split = "test" if i % 10 == 0 else "train"
        d = work / "imgs" / split / ("a" if i % 2 else "b")
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(d / f"{i}.png")
    decoded = args.images * 3 * 64 * 64 / 2 ** 20
    print(f"{args.images:,} PNGs of 64x64x3 in {work / 'imgs'}: {decoded:,.0f} MiB decoded\n")
    base = _peak_mib("import hybvit.folders, hybvit.cli")
    streamed = _peak_mib(f"from hybvit.cli import main; main(['prepare', 'folder:{work / 'imgs'}', '--out', "
                         f"'{work / 'prepared'}'])")
    memory = _peak_mib(f"from pathlib import Path; from hybvit.folders import list_folder; "
                       f"list_folder(Path('{work / 'imgs'}')).to_data()")
    print("| path | peak anonymous memory, MiB | above importing hybvit | peak file-backed resident, MiB |")
    print("|---|---:|---:|---:|")
    for name, (anon, file) in (("importing hybvit only", base),
                               ("`hybvit prepare folder:` (decoded into the mapped files)", streamed),
                               ("decoding into memory", memory)):
        print(f"| {name} | {anon:,.0f} | {anon - base[0]:,.0f} | {file:,.0f} |")
    shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("part", choices=("memory", "augment", "prepare"))
    ap.add_argument("--gb", type=float, default=2.0, help="memory: the training set's size in GB")
    ap.add_argument("--dir", default=None, help="memory: where to write the dataset (default: the temp folder)")
    ap.add_argument("--batch", type=int, default=256, help="augment: the global batch")
    ap.add_argument("--steps", type=int, default=20, help="augment: steps timed per K")
    ap.add_argument("--images", type=int, default=20000, help="prepare: images in the folder")
    args = ap.parse_args()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d')}")
    {"memory": memory, "augment": augment, "prepare": prepare}[args.part](args)


if __name__ == "__main__":
    main()
