"""The CIFAR-10 HybViT learning curve on one GPU, beside the paper code's published log.

Trains `cifar10-hybvit` on the paper's full schedule (AdamW 1e-3, 10 warm-up epochs, cosine over 500 epochs of
3x the data, the full CE augmentation recipe, alpha 100, L1) on the fastest measured path (train.compile: on CUDA
torch.compile with CUDA graphs; the joint CE + diffusion pass and GPU-resident batched augmentation, which hybvit
uses on CUDA by itself), evaluates the raw and EMA test accuracy on all 10,000 test images after every epoch
(train.eval_every=1ep, which also measures the small-fd of 1,000 DDIM-50 samples: the epochs' seconds include it),
and stops gracefully (SIGTERM: checkpoint, exit) once the next epoch would not fit the budget; at least
--min-epochs are trained. Then it draws 1,000 DDIM-50 samples
(`hybvit sample`, the ADM suite's npz) and scores them (`hybvit evaluate --samples --metrics small-fd`).

    python benchmarks/gpu_curve.py --cifar ../shared/data/cifar10-jpg.tar.gz --minutes 5 --out docs/results
    python benchmarks/gpu_curve.py --smoke --out /tmp/gpu-curve-smoke      # the same path on a CPU, seconds

Writes OUT/gpu-curve-<gpu>-<date>.json ({"epochs": [{"epoch", "test_accuracy_raw", "test_accuracy_ema",
"seconds"}, ...], throughput, samples, the commands}), the .png plot with the official curve, the sample grid and
the training log. The CIFAR-10 here is the JPEG copy of ../shared/data, decoded once into an npz.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

# This checkout's hybvit, for this script and the commands it starts: a lent GPU machine runs the working tree
# as it is, without installing it.
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src")] + ([os.environ["PYTHONPATH"]]
                                                                  if os.environ.get("PYTHONPATH") else []))

# The raw model's CIFAR-10 test top-1 (%) after these epochs, from the paper code's published training log
# (../shared/REFERENCE-NOTES.md, last section).
OFFICIAL = {1: 15.04, 2: 20.72, 3: 31.87, 5: 45.83, 10: 65.04, 20: 80.22, 30: 83.61, 40: 86.02, 50: 87.93,
            100: 91.04, 200: 92.54, 300: 94.15, 400: 95.41, 500: 96.20}


def hybvit(*args: str) -> list[str]:
    return [sys.executable, "-m", "hybvit", *args]


def read_log(run: Path) -> list[dict]:
    path = run / "log.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:                                   # a line being written
            pass
    return rows


def train_with_deadline(cmd: list[str], run: Path, steps_per_epoch: int, budget_s: float, min_epochs: int,
                        log_file: Path) -> tuple[int, dict[int, float]]:
    """Run the training command; after each epoch's evaluation, stop it (SIGTERM: a checkpoint, then exit 75) when
    the next epoch would end past the budget and min_epochs are done. Returns the exit status and the seconds since
    the start at which each epoch's evaluation appeared."""
    t0 = time.time()
    seen: dict[int, float] = {}
    with open(log_file, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        stopped = False
        while proc.poll() is None:
            time.sleep(0.2)
            for row in read_log(run):
                if "eval/test_accuracy" in row and row["step"] % steps_per_epoch == 0:
                    seen.setdefault(row["step"] // steps_per_epoch, time.time() - t0)
            if seen and not stopped:
                k = max(seen)
                per_epoch = (seen[k] - seen[min(seen)]) / (k - min(seen)) if k > min(seen) else seen[k]
                if k >= min_epochs and seen[k] + per_epoch > budget_s:
                    proc.send_signal(signal.SIGTERM)
                    stopped = True
            if time.time() - t0 > budget_s + 120 and not stopped:    # a hard stop, whatever happens
                proc.send_signal(signal.SIGTERM)
                stopped = True
        return proc.returncode, seen


def plot(path: Path, epochs: list[dict], title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    last = max([e["epoch"] for e in epochs] + [20])
    official = {k: v for k, v in OFFICIAL.items() if k <= max(last, 50)}
    ax.plot(list(official), list(official.values()), "o--", color="gray", label="paper code's log (raw)")
    ax.plot([e["epoch"] for e in epochs], [100 * e["test_accuracy_raw"] for e in epochs], "o-", label="hybvit raw")
    ax.plot([e["epoch"] for e in epochs], [100 * e["test_accuracy_ema"] for e in epochs], "s-", label="hybvit EMA")
    ax.set_xlabel("epoch (3x the training set)")
    ax.set_ylabel("CIFAR-10 test top-1 (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cifar", type=Path, help="cifar10-jpg.tar.gz (train/ and test/ class folders of JPEGs)")
    ap.add_argument("--minutes", type=float, default=5.0, help="training budget, wall clock (compile included)")
    ap.add_argument("--min-epochs", type=int, default=10)
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--smoke", action="store_true", help="digits and a tiny model on the CPU: every path, seconds")
    ap.add_argument("--out", type=Path, required=True, help="folder for the JSON, the plots and the log")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    env_note = f"python {sys.version.split()[0]}"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.smoke:
            data, preset = "digits", "digits-hybvit"
            extra = ["--set", "model.dim=32", "--set", "model.depth=2", "--set", "model.heads=2", "--epochs", "500",
                     "--set", "train.device=cpu"]
            min_epochs, samples, steps = 2, 40, 3
        else:
            if args.cifar is None:
                ap.error("--cifar PATH is needed (or --smoke)")
            t = time.time()
            with tarfile.open(args.cifar) as tar:
                tar.extractall(tmp / "cifar10", filter="data")
            root = next(p.parent for p in (tmp / "cifar10").rglob("train") if p.is_dir())
            from hybvit.datasets import load_data                # decode the JPEGs once; every step reads the npz
            import numpy as np
            d = load_data(f"folder:{root}")
            np.savez(tmp / "cifar10.npz", x_train=d.x_train.permute(0, 2, 3, 1).numpy(), y_train=d.y_train.numpy(),
                     x_test=d.x_test.permute(0, 2, 3, 1).numpy(), y_test=d.y_test.numpy())
            data, preset = f"npz:{tmp / 'cifar10.npz'}", "cifar10-hybvit"
            extra = ["--set", "train.compile=true"]         # CUDA: mode reduce-overhead and the joint pass
            min_epochs, samples, steps = args.min_epochs, args.samples, 50
            print(f"extracted CIFAR-10 in {time.time() - t:.0f} s", flush=True)
        run = tmp / "run"
        cmd = hybvit("train", "--preset", preset, "--data", data, "--out", str(run), "--quiet",
                     "--set", "train.eval_every=1ep", "--set", "train.ckpt_every=100000000", *extra)
        if args.smoke:
            cmd += ["--stop-after", "4ep"]
        print("$ " + shlex.join(cmd[2:]).replace(str(tmp), "$TMP"), flush=True)
        from hybvit.config import preset_config
        from hybvit.datasets import load_data
        from hybvit.budget import steps_per_epoch
        cfg = preset_config(preset)
        n_train = len(load_data(data).x_train)
        spe = steps_per_epoch(cfg, n_train)
        t_start = time.time()
        rc, seen = train_with_deadline(cmd, run, spe, 60 * args.minutes, min_epochs, args.out / "gpu-curve-train.log")
        train_wall = time.time() - t_start
        if rc not in (0, 75):
            sys.exit(f"training failed (exit {rc}); see {args.out / 'gpu-curve-train.log'}")
        rows = read_log(run)
        evals = {r["step"] // spe: r for r in rows if "eval/test_accuracy" in r and r["step"] % spe == 0}
        epochs = [{"epoch": k, "test_accuracy_raw": evals[k]["eval/test_accuracy_raw"],
                   "test_accuracy_ema": evals[k]["eval/test_accuracy"], "seconds": round(seen.get(k, 0.0), 1)}
                  for k in sorted(evals)]
        speed = [r["speed/images_per_s"] for r in rows if "speed/images_per_s" in r]
        run_cfg = json.loads((run / "config.json").read_text())
        ips = speed[-1] if speed else None
        images_per_step = 2 * run_cfg["train"]["batch_size"]
        from hybvit.checkpoint import load_training_state
        stopped_at = load_training_state(run / "checkpoints" / "last.pt")["step"]

        # 1,000 DDIM-50 samples of the EMA weights, written as the ADM suite's npz and scored from the file
        npz = tmp / "samples.npz"
        sample_cmd = hybvit("sample", "--run", str(run), "--num", str(samples), "--steps", str(steps), "--out",
                            str(npz), "--quiet")
        subprocess.run(sample_cmd, check=True)
        report = tmp / "small-fd.json"
        eval_cmd = hybvit("evaluate", "--samples", str(npz), "--data", data, "--metrics", "small-fd", "--out",
                          str(report), "--no-html", "--quiet")
        subprocess.run(eval_cmd, check=True, stdout=subprocess.DEVNULL)
        small_fd = json.loads(report.read_text())["metrics"]["small-fd"]
        from hybvit.provenance import device_name
        import numpy as np
        import torch
        from hybvit.sample import make_grid, save_png
        from hybvit.data import to_float
        with np.load(npz) as f:
            x = torch.from_numpy(f["arr_0"][:100]).permute(0, 3, 1, 2)
        device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
        gpu = device_name(device)
        slug = "cpu-smoke" if args.smoke else gpu.lower().replace("nvidia ", "").replace(" ", "-")
        stem = f"gpu-curve-{slug}-{time.strftime('%Y-%m-%d')}"
        save_png(args.out / f"{stem}-samples.png", make_grid(to_float(x)))
        result = {
            "gpu": gpu, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "env": env_note,
            "command": "python benchmarks/gpu_curve.py " + shlex.join(sys.argv[1:]),
            "train_command": shlex.join(["hybvit", *cmd[3:]]).replace(str(tmp), "$TMP"),
            "steps_per_epoch": spe, "stopped_at_step": stopped_at, "train_exit_status": rc,
            "train_wall_seconds": round(train_wall, 1),
            "epochs": epochs,
            "throughput": {"images_per_second": ips, "images_per_step": images_per_step,
                           "seconds_per_epoch": round(spe * images_per_step / ips, 2) if ips else None,
                           "projected_hours_500_epochs": round(500 * spe * images_per_step / ips / 3600, 2)
                           if ips else None,
                           "note": "end to end: full augmentation recipe, both branches, optimizer, EMA; "
                                   "excludes the per-epoch test evaluation"},
            "samples": {"num": samples, "sampler": f"ddim-{steps}", "small_fd": small_fd["value"],
                        "reference": small_fd["reference"],
                        "commands": [shlex.join(["hybvit", *c[3:]]).replace(str(tmp), "$TMP")
                                     for c in (sample_cmd, eval_cmd)]},
            "official_raw_accuracy_percent": OFFICIAL,
        }
        (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
        if epochs:
            try:
                plot(args.out / f"{stem}.png", epochs, f"cifar10-hybvit on {gpu}, {time.strftime('%Y-%m-%d')}")
            except ImportError as e:                          # the JSON above has every figure
                print(f"no plot: {e}")
        for e in epochs:
            ref = OFFICIAL.get(e["epoch"])
            print(f"epoch {e['epoch']:3d}: raw {100 * e['test_accuracy_raw']:.2f} %, EMA {100 * e['test_accuracy_ema']:.2f} %"
                  + (f" (paper code's log: {ref:.2f} %)" if ref else "") + f", {e['seconds']:.0f} s")
        print(f"throughput {ips} images/s; small-fd of {samples} samples {small_fd['value']:.2f}; "
              f"-> {args.out / stem}.json")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
