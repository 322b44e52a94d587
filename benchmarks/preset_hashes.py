"""Every preset's resolved configuration and its weights after a few steps, as digests: a refactoring that must not
change what any preset trains compares two of these files.

    python benchmarks/preset_hashes.py --out before.json
    python benchmarks/preset_hashes.py --out after.json --compare before.json

Each preset trains 3 steps at batch 8 on one thread (bitwise reproducible on one machine) on data of its own shape:
the bundled digits for the digits presets and the default run, else a small random npz with the preset's image
size, channels and classes. Also covered: your data with no preset and with --preset own-data, at 28x28x1 and
32x32x3. The digest of a configuration covers the keys both files have, so a removed option shows as "removed".
"""
import argparse
import hashlib
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from hybvit.config import PRESETS, preset_config

STEPS = ["--steps", "3", "--set", "train.batch_size=8", "--set", "train.threads=1", "--set", "train.fd_samples=0",
         "--quiet"]


def fake_npz(path: Path, size: int, channels: int, classes: int) -> Path:
    g = np.random.default_rng(0)
    n_train, n_test = max(2 * classes, 64), max(classes, 16)
    shape = (size, size) if channels == 1 else (size, size, channels)
    np.savez(path, x_train=g.integers(0, 256, (n_train, *shape), dtype=np.uint8),
             y_train=np.arange(n_train) % classes, x_test=g.integers(0, 256, (n_test, *shape), dtype=np.uint8),
             y_test=np.arange(n_test) % classes)
    return path


def tensors_digest(tensors: dict) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().contiguous().cpu()
        h.update(key.encode() + str(t.dtype).encode() + t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def cases(work: Path) -> dict[str, list[str]]:
    out = {"(default run)": []}
    for name in PRESETS:
        cfg = preset_config(name)
        if cfg.data.spec == "digits" and name != "own-data":
            out[name] = ["--preset", name]
            continue
        m = cfg.model
        npz = fake_npz(work / f"{m.image_size}-{m.channels}-{m.num_classes}.npz", m.image_size, m.channels,
                       m.num_classes)
        out[name] = ["--preset", name, "--data", f"npz:{npz}"]
    for size, ch in ((28, 1), (32, 3)):
        npz = fake_npz(work / f"own-{size}-{ch}.npz", size, ch, 10)
        out[f"(no preset, {size}x{size}x{ch})"] = ["--data", f"npz:{npz}"]
        out[f"(own-data, {size}x{size}x{ch})"] = ["--data", f"npz:{npz}", "--preset", "own-data"]
    return out


def run_case(args: list[str], run: Path) -> dict:
    subprocess.run([sys.executable, "-m", "hybvit", "train", *args, *STEPS, "--out", str(run)], check=True)
    config = json.loads((run / "config.json").read_text())
    for section in ("data",):
        config[section].pop("spec", None)           # the temporary folder's name
    last = torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    return {"config": config, "model": tensors_digest(last["model"]), "ema": tensors_digest(last["ema"])}


def compare(now: dict, before: dict) -> list[str]:
    lines = []
    for name, b in before.items():
        a = now.get(name)
        if a is None:
            lines.append(f"{name}: missing")
            continue
        diffs = []
        for section, values in b["config"].items():
            if not isinstance(values, dict):
                if values != a["config"].get(section):
                    diffs.append(f"{section}: {values!r} -> {a['config'].get(section)!r}")
                continue
            for key, value in values.items():
                if key not in a["config"].get(section, {}):
                    diffs.append(f"{section}.{key} removed (was {value!r})")
                elif a["config"][section][key] != value:
                    diffs.append(f"{section}.{key}: {value!r} -> {a['config'][section][key]!r}")
        same = a["model"] == b["model"] and a["ema"] == b["ema"]
        lines.append(f"{name}: weights {'same' if same else 'DIFFER'}" + ("; " + "; ".join(diffs) if diffs else ""))
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--compare", type=Path, help="an earlier output: print what differs")
    ap.add_argument("--only", default="", help="comma-separated case names (default: all)")
    a = ap.parse_args()
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name, args in cases(work).items():
            if a.only and name not in re.split(r",(?![^()]*\))", a.only):     # commas inside (...) are names
                continue
            result[name] = run_case(args, work / "run")
            print(f"{name}: model {result[name]['model']} ema {result[name]['ema']}", flush=True)
            subprocess.run(["rm", "-rf", str(work / "run")], check=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    if a.compare:
        print("\n".join(compare(result, json.loads(a.compare.read_text()))))


if __name__ == "__main__":
    main()
