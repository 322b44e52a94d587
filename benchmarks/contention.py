"""The default digits run on a shared machine: its steps/s alone and while a second training run shares the
cores, under OpenMP wait policies (libgomp's default, PASSIVE, shorter spin counts).

    python benchmarks/contention.py                 # ~7 minutes on 2 cores; prints a table and writes nothing
    python benchmarks/contention.py --seconds 60 --rows "OpenMP default,PASSIVE" --json contention.json

Each phase trains the default preset (`hybvit train --minutes M`, no end-of-run sampling) in fresh processes:
alone, then two at once. The slowdown is steps/s alone over steps/s shared (ideal: 2 on a machine whose cores the
two runs split; spin-waiting OpenMP threads of one run steal the cores the other needs, which makes it far worse).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Each row: the OpenMP environment of both runs. OMP_WAIT_POLICY="" is libgomp's default (it warns about the empty
# value and ignores it: threads spin ~300,000 iterations before they sleep).
POLICIES = {"OpenMP default": {"OMP_WAIT_POLICY": ""}, "PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
            "spin 10k": {"OMP_WAIT_POLICY": "", "GOMP_SPINCOUNT": "10000"},
            "spin 30k": {"OMP_WAIT_POLICY": "", "GOMP_SPINCOUNT": "30000"}}


def launch(out: Path, seconds: float, policy: dict) -> subprocess.Popen:
    env = dict(os.environ, **policy)
    cmd = [sys.executable, "-m", "hybvit", "train", "--minutes", str(seconds / 60), "--out", str(out), "--quiet",
           "--set", "fd_samples=0", "--set", "num_samples=0", "--set", "amp=fp32"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def steps_per_second(out: Path) -> float:
    m = json.loads((out / "metrics.json").read_text())
    return m["steps"] / m["train_seconds"]


def phase(work: Path, name: str, seconds: float, policy: dict, n: int) -> list[float]:
    outs = [work / f"{name}-{i}" for i in range(n)]
    procs = [launch(o, seconds, policy) for o in outs]
    for p in procs:
        if p.wait() != 0:
            raise SystemExit(f"a training run failed in phase {name}")
    return [steps_per_second(o) for o in outs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=40, help="training time of each run (default 40)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--rows", help="comma-separated row names (default: all)")
    args = ap.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, policy in POLICIES.items():
            if args.rows and label not in args.rows.split(","):
                continue
            alone = phase(Path(tmp), f"{label}-alone", args.seconds, policy, 1)[0]
            shared = phase(Path(tmp), f"{label}-shared", args.seconds, policy, 2)
            rows[label] = {"alone_steps_per_s": round(alone, 2), "shared_steps_per_s": [round(s, 2) for s in shared],
                           "slowdown": round(alone / (sum(shared) / len(shared)), 2)}
    base = rows.get("OpenMP default", next(iter(rows.values())))["alone_steps_per_s"]
    print(f"default digits run (fp32), {args.seconds:g} s per run, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}")
    print(f"{'policy':<22}{'alone steps/s':>15}{'shared steps/s (each)':>24}{'slowdown':>10}{'alone vs default':>18}")
    for label, r in rows.items():
        shared = " / ".join(f"{s:.2f}" for s in r["shared_steps_per_s"])
        print(f"{label:<22}{r['alone_steps_per_s']:>15.2f}{shared:>24}{r['slowdown']:>9.2f}x"
              f"{r['alone_steps_per_s'] / base:>17.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"seconds": args.seconds, "cpus": os.cpu_count(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
