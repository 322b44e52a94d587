"""The default digits run on a shared machine: its steps/s alone and while a second training run shares the
cores: as it runs by default (threads governed, threads.py), and with its threads fixed under OpenMP wait policies
(libgomp's default, PASSIVE, a shorter spin count).

    python benchmarks/contention.py                 # ~7 minutes on 2 cores; prints a table and writes nothing
    python benchmarks/contention.py --seconds 60 --rows "default (governed),fixed threads" --json contention.json

Each phase trains the default preset (`hybvit train --minutes M`; steps/s over the training seconds, so the 100
samples a run draws after its budget are not counted) in fresh processes: alone, then two at once. The slowdown is steps/s alone over steps/s shared (ideal: 2 on a machine whose cores the
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

from hybvit.threads import default_threads

# Each row: the OpenMP environment of both runs and their extra flags. OMP_WAIT_POLICY="" is libgomp's default (it
# warns about the empty value and ignores it: threads spin ~300,000 iterations before they sleep). "fixed threads"
# pins every core's thread for the whole run (train.threads=N: what hybvit did before its thread governor).
FIXED = ["--set", f"train.threads={default_threads()}"]
POLICIES = {"default (governed)": ({"OMP_WAIT_POLICY": ""}, []),
            "fixed threads": ({"OMP_WAIT_POLICY": ""}, FIXED),
            "fixed threads, PASSIVE": ({"OMP_WAIT_POLICY": "PASSIVE"}, FIXED),
            "fixed threads, spin 10k": ({"OMP_WAIT_POLICY": "", "GOMP_SPINCOUNT": "10000"}, FIXED)}


def launch(out: Path, seconds: float, policy: tuple[dict, list]) -> subprocess.Popen:
    env = dict(os.environ, **policy[0])
    cmd = [sys.executable, "-m", "hybvit", "train", "--minutes", str(seconds / 60), "--out", str(out), "--quiet",
           "--set", "fd_samples=0", "--set", "amp=fp32", *policy[1]]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def steps_per_second(out: Path) -> float:
    m = json.loads((out / "metrics.json").read_text())
    return m["steps"] / m["train_seconds"]


def phase(work: Path, name: str, seconds: float, policy: dict, n: int, loop: bool = False) -> list[float]:
    """n training runs at once (and, with loop, a single-threaded pure-Python loop beside them)."""
    outs = [work / f"{name}-{i}" for i in range(n)]
    partner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if loop else None
    try:
        procs = [launch(o, seconds, policy) for o in outs]
        for p in procs:
            if p.wait() != 0:
                raise SystemExit(f"a training run failed in phase {name}")
    finally:
        if partner is not None:
            partner.kill()
    return [steps_per_second(o) for o in outs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=40, help="training time of each run (default 40)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--rows", help="comma-separated row names (default: all)")
    ap.add_argument("--partner", default="train", choices=["train", "loop"],
                    help="what shares the cores: a second training run (default) or a pure-Python loop")
    args = ap.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, policy in POLICIES.items():
            if args.rows and label not in args.rows.split(","):
                continue
            alone = phase(Path(tmp), f"{label}-alone", args.seconds, policy, 1)[0]
            shared = phase(Path(tmp), f"{label}-shared", args.seconds, policy, *((2, False) if args.partner == "train"
                                                                                 else (1, True)))
            rows[label] = {"alone_steps_per_s": round(alone, 2), "shared_steps_per_s": [round(s, 2) for s in shared],
                           "slowdown": round(alone / (sum(shared) / len(shared)), 2)}
    base = rows.get("fixed threads", next(iter(rows.values())))["alone_steps_per_s"]
    print(f"default digits run (fp32), {args.seconds:g} s per run, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}, "
          f"sharing with {'a second training run' if args.partner == 'train' else 'a pure-Python loop'}")
    print(f"{'policy':<22}{'alone steps/s':>15}{'shared steps/s (each)':>24}{'slowdown':>10}{'alone vs fixed':>16}")
    for label, r in rows.items():
        shared = " / ".join(f"{s:.2f}" for s in r["shared_steps_per_s"])
        print(f"{label:<22}{r['alone_steps_per_s']:>15.2f}{shared:>24}{r['slowdown']:>9.2f}x"
              f"{r['alone_steps_per_s'] / base:>15.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"seconds": args.seconds, "cpus": os.cpu_count(), "partner": args.partner,
                                         "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
