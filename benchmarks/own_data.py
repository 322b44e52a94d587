"""What `hybvit train --data npz:YOURS` gives on data nobody tuned for: a panel of datasets made offline.

For each dataset, at one wall-clock budget per training run, on this machine, one process at a time:
  * a small CNN trained for the same wall time: the accuracy to beat;
  * a judge: the same CNN trained for a fixed number of steps (JUDGE_STEPS, not wall time), whose penultimate
    features are the space of the sample metric, so FDs compare across budgets and invocations. Judges and bars
    are kept in --judges (default ~/.cache/hybvit/own-data-judges), keyed by the dataset's contents (and, for the
    wall-time bar, the machine), and reused: a 15-minute panel need not retrain its 15-minute CNN;
  * hybvit rows, each in a fresh process: `no-preset` (what `hybvit train --data npz:PATH` does: the digits preset
    adapted to the data, its patch chosen to keep 16 tokens where a patch's values fit the token, with a
    16-channel convolutional stem, and a crop and label smoothing kept in runs of 30+ epochs), `own-data`
    (`--preset own-data`: the -plus architecture with a patch for a grid of about 8x8 tokens and the crop / label
    smoothing recipe), and the measured alternatives in row_args (`--rows no-preset,no-preset-linear,...`), among
    them `classifier-only`: the no-preset model trained as a plain ViT classifier, with no samples to score;
  * for each hybvit row: test accuracy, and 1000 DDIM-50 samples of the EMA weights scored by a Frechet distance
    against the test set (with real-vs-real and noise-vs-real on the same scale)
    and by the judge's class shares (the largest share, against 1/K for balanced samples).

    python benchmarks/own_data.py --cifar ../shared/data/cifar10-jpg.tar.gz --minutes 10 --out docs/results/own-data
    python benchmarks/own_data.py --smoke --out /tmp/own-smoke       # seconds: every path, tiny budgets

The panel: digits28 (scikit-learn's digits upscaled to 28x28), cifar-gray28 (10,000 CIFAR-10 training images in
grayscale at 28x28), cifar32 (10,000 at 32x32, colour) and few-gray28 (30 images per class). Test sets: digits'
own 360, and 2,000 CIFAR-10 test images (200 per class). Writes OUT.json, OUT.md and OUT-<dataset>-<row>.png.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from hybvit.augment import crop_flip
from hybvit.data import to_float, to_uint8
from hybvit.datasets import load_data
from hybvit.evaluate.frechet import frechet_distance
from hybvit.precision import cpu_model
from hybvit.resolve import own_data_crop
from hybvit.sample import load_run, make_grid, save_png

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# ----------------------------------------------------------------------------- the panel's datasets

def _resize(x: np.ndarray, size: int) -> np.ndarray:
    """uint8 (N, H, W[, C]) -> (N, size, size[, C]), bicubic with antialiasing."""
    t = torch.from_numpy(x).float()
    t = t[:, None] if t.dim() == 3 else t.permute(0, 3, 1, 2)
    t = F.interpolate(t, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    t = t.round().clamp(0, 255).to(torch.uint8)
    return (t[:, 0] if t.shape[1] == 1 else t.permute(0, 2, 3, 1)).numpy()


def _cifar_split(root: Path, split: str, per_class: int, gray: bool) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for k, name in enumerate(CLASSES):
        files = sorted((root / split / name).glob("*.jpg"))[:per_class]
        for f in files:
            with Image.open(f) as im:
                xs.append(np.asarray(im.convert("L" if gray else "RGB")))
        ys += [k] * len(files)
    return np.stack(xs), np.array(ys, dtype=np.int64)


def make_panel(cifar_tar: Path | None, work: Path, smoke: bool) -> dict[str, Path]:
    """Write the panel's datasets as npz files (hybvit's documented format) into work; returns name -> path."""
    out = {}
    d = load_data("digits")
    up = lambda x: _resize(x[:, 0].numpy(), 28)                                          # noqa: E731
    out["digits28"] = work / "digits28.npz"
    np.savez(out["digits28"], x_train=up(d.x_train), y_train=d.y_train.numpy(), x_test=up(d.x_test),
             y_test=d.y_test.numpy())
    if cifar_tar is None:
        return out
    root = work / "cifar"
    with tarfile.open(cifar_tar) as tar:
        tar.extractall(root, filter="data")
    n_train, n_test, n_few = (100, 20, 5) if smoke else (1000, 200, 30)
    for gray in (True, False):
        x_tr, y_tr = _cifar_split(root, "train", n_train, gray)
        x_te, y_te = _cifar_split(root, "test", n_test, gray)
        if gray:
            x_tr, x_te = _resize(x_tr, 28), _resize(x_te, 28)
            few = np.concatenate([np.flatnonzero(y_tr == k)[:n_few] for k in range(10)])
            out["cifar-gray28"] = work / "cifar-gray28.npz"
            np.savez(out["cifar-gray28"], x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te)
            out["few-gray28"] = work / "few-gray28.npz"
            np.savez(out["few-gray28"], x_train=x_tr[few], y_train=y_tr[few], x_test=x_te, y_test=y_te)
        else:
            out["cifar32"] = work / "cifar32.npz"
            np.savez(out["cifar32"], x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te)
    return out


# ----------------------------------------------------------------------------- the reference CNN

class SmallCNN(nn.Module):
    """Three conv blocks (32, 64, 128 channels) and a 128-d feature layer: a plain, strong-enough baseline."""

    def __init__(self, channels: int, classes: int):
        super().__init__()
        block = lambda i, o: nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(),   # noqa
                                           nn.Conv2d(o, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2))
        self.body = nn.Sequential(block(channels, 32), block(32, 64), block(64, 128), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten(), nn.Linear(128, 128), nn.ReLU())
        self.head = nn.Linear(128, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def train_cnn(data, minutes: float | None = None, max_steps: int | None = None, seed: int = 0) -> tuple[SmallCNN, dict]:
    """Adam 1e-3, batch 128, random crop (an eighth of the image, as the own-data default) for `minutes` of wall
    time or for `max_steps` steps."""
    torch.manual_seed(seed)
    cnn = SmallCNN(data.channels, data.num_classes)
    opt = torch.optim.Adam(cnn.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    pad = own_data_crop(data.image_size)
    t0, steps = time.time(), 0
    cnn.train()
    while (steps < max_steps) if max_steps is not None else (time.time() - t0 < 60 * minutes):
        idx = torch.randint(0, len(data.x_train), (min(128, len(data.x_train)),), generator=g)
        x = to_float(crop_flip(data.x_train[idx], pad, False, g))
        loss = F.cross_entropy(cnn(x), data.y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
    cnn.eval()
    acc = (predict(cnn, data.x_test) == data.y_test).double().mean().item()
    return cnn, {"test_accuracy": round(acc, 4), "steps": steps, "seconds": round(time.time() - t0, 1)}


JUDGE_STEPS = 2000          # about 25 epochs of a 10,000-image set; 5-8 CPU-minutes


def fingerprint(data) -> str:
    """A digest of the dataset's arrays: a cached judge or bar is reused only for the same images and labels."""
    h = hashlib.sha256()
    for t in (data.x_train, data.y_train, data.x_test, data.y_test):
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def cached_cnn(data, name: str, cache: Path | None, minutes: float | None, max_steps: int | None,
               machine: str) -> tuple[SmallCNN, dict]:
    """The judge (max_steps) or the wall-time bar (minutes) for this dataset: loaded from cache when its record
    matches the data (and, for a wall-time bar, this machine), else trained and stored there. The weights are
    loaded with weights_only=True: a cache file is data, never code."""
    stem = f"{name}-judge-{max_steps}steps" if max_steps is not None else f"{name}-bar-{minutes:g}min"
    want = {"data": fingerprint(data), **({} if max_steps is not None else {"machine": machine})}
    if cache is not None and (cache / f"{stem}.json").exists() and (cache / f"{stem}.pt").exists():
        info = json.loads((cache / f"{stem}.json").read_text())
        if all(info.get(k) == v for k, v in want.items()):
            cnn = SmallCNN(data.channels, data.num_classes)
            cnn.load_state_dict(torch.load(cache / f"{stem}.pt", map_location="cpu", weights_only=True))
            print(f"   {stem}: reused from {cache} (trained {info['date']})", flush=True)
            return cnn.eval(), {**info, "reused": True}
    cnn, info = train_cnn(data, minutes=minutes, max_steps=max_steps)
    info.update(want, machine=machine, date=time.strftime("%Y-%m-%d"))
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        torch.save(cnn.state_dict(), cache / f"{stem}.pt")
        (cache / f"{stem}.json").write_text(json.dumps(info, indent=1) + "\n")
    return cnn, {**info, "reused": False}


@torch.no_grad()
def predict(cnn: SmallCNN, x_uint8: torch.Tensor) -> torch.Tensor:
    return torch.cat([cnn(to_float(x_uint8[i:i + 500])).argmax(1) for i in range(0, len(x_uint8), 500)])


@torch.no_grad()
def features(cnn: SmallCNN, x_uint8: torch.Tensor) -> np.ndarray:
    return torch.cat([cnn.body(to_float(x_uint8[i:i + 500])) for i in range(0, len(x_uint8), 500)]).double().numpy()


# ----------------------------------------------------------------------------- hybvit rows

def row_args(row: str) -> list[str]:
    """The flags of a row beyond --data, --minutes and --out. The default for a user's data (no preset) is the
    own-data preset; the rows from before that rule (the adapted digits preset with a conv stem and a recipe switch)
    ran at commit 47f41ef, whose benchmark still has them."""
    return {"no-preset": [], "own-data": ["--preset", "own-data"],
            # the crop and label smoothing forced off
            "no-recipe": ["--set", "data.crop_padding=0", "--set", "train.label_smoothing=0"],
            # own-data at about the adapted digits model's cost per step (D 96, depth 3)
            "own-data-small": ["--set", "model.dim=96", "--set", "model.depth=3"],
            # the digits preset, adapted to the data's shape (its patch, 16 tokens at 28x28 would be patch 7)
            "digits": ["--preset", "digits-hybvit"],
            # the same model trained as a plain ViT classifier (no diffusion loss, no samples): what the
            # architecture classifies in the budget when it has the whole budget for the one task
            "classifier-only": ["--set", "train.mode=vit"]}[row]


def train_row(npz: Path, row: str, minutes: float, out: Path, smoke: bool) -> dict:
    cmd = [sys.executable, "-m", "hybvit", "train", "--data", f"npz:{npz}", "--minutes", str(minutes), "--out",
           str(out), "--quiet", *row_args(row)]
    if smoke:
        cmd += ["--set", "model.dim=64", "--set", "model.depth=2", "--set", "model.heads=2", "--set", "fd_samples=0"]
    t0 = time.time()
    subprocess.run(cmd, check=True)
    metrics = json.loads((out / "metrics.json").read_text())
    config = json.loads((out / "config.json").read_text())
    with np.load(npz) as arrays:
        epochs = metrics["steps"] * config["train"]["batch_size"] / len(arrays["y_train"])
    return {"command": " ".join(["hybvit train --data npz:PATH --minutes", f"{minutes:g}", *row_args(row)]),
            "mode": config["train"]["mode"], "epochs": round(epochs, 1),
            "test_accuracy": round(metrics["test_accuracy"], 4), "steps": metrics["steps"],
            "params": metrics["params"], "patch": config["model"]["patch_size"], "dim": config["model"]["dim"],
            "wall_seconds": round(time.time() - t0, 1)}


def score_samples(run_dir: Path, cnn: SmallCNN, data, test_feats: np.ndarray, n: int, grid: Path, steps: int) -> dict:
    run = load_run(run_dir, device="cpu")
    x = run.sample(n, sampler="ddim", steps=steps, seed=0)
    save_png(grid, make_grid(x[:64]))
    x8 = to_uint8(x)
    shares = torch.bincount(predict(cnn, x8), minlength=data.num_classes).double() / n
    return {"feature_fd": round(frechet_distance(features(cnn, x8), test_feats), 2),
            "largest_class_share": round(float(shares.max()), 3), "class_shares": [round(float(s), 3) for s in shares]}


# ----------------------------------------------------------------------------- the panel

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cifar", type=Path, help="cifar10-jpg.tar.gz (train/ and test/ class folders of JPEGs)")
    ap.add_argument("--minutes", type=float, default=10.0, help="wall-clock budget of each training run")
    ap.add_argument("--datasets", default="digits28,cifar-gray28,cifar32,few-gray28")
    ap.add_argument("--rows", default="no-preset")
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--bar-minutes", type=float, default=None,
                    help="wall time of the CNN that sets the accuracy bar (default: --minutes; 0: no bar)")
    ap.add_argument("--smoke", action="store_true", help="tiny models, budgets and subsets: checks every path")
    ap.add_argument("--out", type=Path, required=True, help="OUT: writes OUT.json, OUT.md, OUT-<set>-<row>.png")
    ap.add_argument("--judges", default=str(Path.home() / ".cache" / "hybvit" / "own-data-judges"),
                    help="folder that keeps each dataset's judge and wall-time CNN for reuse ('none': keep nothing)")
    args = ap.parse_args()
    minutes, n_samples, steps = (0.05, 40, 3) if args.smoke else (args.minutes, args.samples, 50)
    judge_steps = 20 if args.smoke else JUDGE_STEPS
    cache = None if args.judges == "none" else Path(args.judges)
    machine = f"{cpu_model()}, {os.cpu_count()} cores"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"machine": machine, "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d"), "minutes": minutes, "samples": n_samples, "sample_steps": steps,
              "command": "python benchmarks/own_data.py " + " ".join(sys.argv[1:]),
              "datasets": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        panel = make_panel(args.cifar, work, args.smoke)
        for name in args.datasets.split(","):
            if name not in panel:
                print(f"skipping {name}: needs --cifar")
                continue
            data = load_data(f"npz:{panel[name]}")
            print(f"== {data.describe()}", flush=True)
            bar = minutes if args.bar_minutes is None or args.smoke else args.bar_minutes
            cnn_row = cached_cnn(data, name, cache, bar, None, machine)[1] if bar > 0 else None
            cnn, judge_row = cached_cnn(data, name, cache, None, judge_steps, machine)
            test_feats = features(cnn, data.x_test)
            g = torch.Generator().manual_seed(1)
            real = data.x_train[torch.randperm(len(data.x_train), generator=g)[:len(data.x_test)]]
            noise = torch.randint(0, 256, (n_samples, *data.x_test.shape[1:]), generator=g, dtype=torch.uint8)
            entry = {"images": [len(data.x_train), len(data.x_test)], "size": data.image_size,
                     "channels": data.channels, "cnn": cnn_row, "judge": judge_row,
                     "scale": {"real_vs_real_fd": round(frechet_distance(features(cnn, real), test_feats), 2),
                               "noise_vs_real_fd": round(frechet_distance(features(cnn, noise), test_feats), 2)},
                     "rows": {}}
            for row in args.rows.split(","):
                run_dir = work / f"{name}-{row}"
                r = train_row(panel[name], row, minutes, run_dir, args.smoke)
                if r["mode"] != "vit":      # a classifier alone has no samples to score
                    r.update(score_samples(run_dir, cnn, data, test_feats, n_samples,
                                           Path(f"{args.out}-{name}-{row}.png"), steps))
                entry["rows"][row] = r
                print(f"   {row}: {r}", flush=True)
            result["datasets"][name] = entry
            Path(f"{args.out}.json").write_text(json.dumps(result, indent=1) + "\n")
    Path(f"{args.out}.md").write_text(table(result))
    print(table(result))


def table(result: dict) -> str:
    lines = [f"{result['minutes']:g} minutes per training run; {result['machine']}, torch {result['torch']}, "
             f"{result['date']}; {result['samples']} DDIM-{result['sample_steps']} samples per row, scored in the "
             f"features of a judge CNN trained for a fixed number of steps (its test accuracy in brackets).", "",
             f"`{result['command']}`", "",
             "| dataset | train / test | row | patch | steps | epochs | test acc | CNN acc | feature FD (judge acc) "
             "| real / noise FD | largest class share (balanced: 1/K) |", "|---|---|---|" + "---:|" * 8]
    for name, e in result["datasets"].items():
        for row, r in e["rows"].items():
            scored = "feature_fd" in r                # a classifier-only row has no samples
            fd = f"{r['feature_fd']:.2f} ({e['judge']['test_accuracy']:.3f})" if scored else "no samples"
            share = f"{r['largest_class_share']:.2f}" if scored else "-"
            scale = f"{e['scale']['real_vs_real_fd']:.2f} / {e['scale']['noise_vs_real_fd']:.1f}"
            bar_acc = f"{e['cnn']['test_accuracy']:.3f}" if e["cnn"] else "-"
            lines.append(f"| {name} | {e['images'][0]} / {e['images'][1]} | {row} | {r['patch']} | {r['steps']} | "
                         f"{r.get('epochs', '-')} | {r['test_accuracy']:.3f} | {bar_acc} | "
                         f"{fd} | {scale} | {share} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
