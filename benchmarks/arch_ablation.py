"""Equal-wall-clock comparison of the -plus architecture and the diffusion options beyond the paper against the
faithful HybViT.

    python benchmarks/arch_ablation.py --preset digits-hybvit --minutes 5 --out docs/results/arch-ablation-digits
    python benchmarks/arch_ablation.py --preset cifar10-hybvit-small --data folder:/tmp/cifar --minutes 20 \
        --rows faithful,all --fd small-fd --out docs/results/arch-ablation-cifar10

Each row trains the preset with one change (same seed, same wall-clock budget, one process at a time): "plus" the
-plus architecture (model.plus: adaLN-Zero, time token, long skips and a zero-initialised output layer, one switch
since they were measured one by one, docs/results/arch-ablation-digits.md), "min-snr" and "v-pred" a diffusion
option, "all" the three together (what the *-plus presets train). Each row then measures test accuracy (EMA), a
Frechet distance of 1000 DDIM-50 samples against the test set (pixel space for digits; the fixed random-CNN features
of `hybvit evaluate --metrics small-fd` otherwise, the same extractor for every row) and training steps/s. Writes
OUT.json and OUT.md (a table with the commands).
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROWS = {
    "faithful": [],
    "plus": ["model.plus=true"],
    "min-snr": ["diffusion.weighting=min-snr"],
    "v-pred": ["diffusion.prediction=v"],
    "all": ["model.plus=true", "diffusion.weighting=min-snr", "diffusion.prediction=v"],
}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="digits-hybvit")
    p.add_argument("--data", default=None)
    p.add_argument("--minutes", type=float, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--plus", default="", help="the --set list of the 'plus' row, comma-separated (default: "
                   "model.plus=true)")
    p.add_argument("--fd", default="pixel-fd", choices=["pixel-fd", "small-fd"])
    p.add_argument("--runs", default="/tmp/arch-ablation")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    rows = dict(ROWS, plus=[s for s in a.plus.split(",") if s] or ROWS["plus"])
    results = []
    out = Path(a.out)
    if out.with_suffix(".json").exists():
        results = json.loads(out.with_suffix(".json").read_text())["rows"]
    done = {r["row"] for r in results}
    for name in a.rows.split(","):
        if name in done:
            continue
        run = Path(a.runs) / f"{a.preset}-{name}-s{a.seed}"
        sets = [x for s in rows[name] for x in ("--set", s)]
        train = [sys.executable, "-m", "hybvit", "train", "--preset", a.preset, "--minutes", str(a.minutes),
                 "--seed", str(a.seed), "--out", str(run), "--quiet", *sets] + (["--data", a.data] if a.data else [])
        t0 = time.time()
        subprocess.run(train, check=True)
        m = json.loads((run / "metrics.json").read_text())
        ev = [sys.executable, "-m", "hybvit", "evaluate", "--run", str(run), "--metrics", a.fd, "--num-samples",
              "1000", "--steps", "50", "--out", str(run / "fd.json"), "--no-html"]
        subprocess.run(ev, check=True)
        fd = json.loads((run / "fd.json").read_text())["metrics"][a.fd]["value"]
        row = {"row": name, "sets": rows[name], "test_accuracy": m.get("test_accuracy"), a.fd: round(fd, 4),
               "steps": m["steps"], "steps_per_second": round(m["steps"] / m["train_seconds"], 3),
               "params": m["params"], "wall_seconds": round(time.time() - t0, 1),
               "command": " ".join(train[2:]).replace(sys.executable, "python")}
        print(json.dumps(row), flush=True)
        results.append(row)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps({"preset": a.preset, "minutes": a.minutes, "fd": a.fd,
                                                        "rows": results}, indent=2))
    lines = [f"| row | options (`--set`) | test acc | {a.fd} (1000 DDIM-50) | steps | steps/s | params |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['row']} | {' '.join(r['sets']) or '(faithful)'} | {r['test_accuracy']:.4f} | "
                     f"{r[a.fd]:.3f} | {r['steps']} | {r['steps_per_second']:.2f} | {r['params']:,} |")
    out.with_suffix(".md").write_text(
        f"# {a.preset}: {a.minutes:g} CPU-minutes per row, seed {a.seed}\n\n"
        f"`python benchmarks/arch_ablation.py {' '.join(sys.argv[1:])}`\n\n" + "\n".join(lines) + "\n\nEach row: "
        f"`python -m hybvit train --preset {a.preset} --minutes {a.minutes:g} --seed {a.seed} --set ...`, then "
        f"`hybvit evaluate --metrics {a.fd} --num-samples 1000 --steps 50`.\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
