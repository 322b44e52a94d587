"""Frechet distance against network evaluations for every sampler, on a trained run.

    python benchmarks/sampler_curve.py --run runs/digits --out docs/results/sampler-curve-digits

For each sampler (the paper's 1000-step ancestral; DDIM; DPM-Solver++ 2M and 3M with log-SNR and time-uniform
spacing) and each number of network evaluations, draws --num samples (same seed for every row) and computes the
pixel-space Frechet distance to the test set (--fd small-fd for RGB data), timing the sampling. Writes OUT.json,
OUT.png (the curve) and prints a table with images/s.
"""
import argparse
import json
import time
from pathlib import Path

import torch

from hybvit.data import to_uint8
from hybvit.datasets import load_data
from hybvit.evaluate.fid import SmallFeatures, extract, frechet_to_reference, reference_stats
from hybvit.evaluate.frechet import pixel_frechet_distance
from hybvit.sample import load_run


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--run", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--num", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fd", default="pixel-fd", choices=["pixel-fd", "small-fd"])
    p.add_argument("--nfe", default="5,10,15,20,50")
    p.add_argument("--ddim-nfe", default="10,20,50,100")
    p.add_argument("--no-ancestral", action="store_true")
    a = p.parse_args()
    run = load_run(a.run, device="cpu")
    data = load_data(run.config.data.spec, run.config.data.image_size)
    if a.fd == "small-fd":
        ext = SmallFeatures()
        ref = reference_stats(ext, data, "cpu")
        fd_of = lambda x: frechet_to_reference(extract(ext, to_uint8(x), "cpu"), ref)
    else:
        fd_of = lambda x: pixel_frechet_distance(x, data.x_test)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {a.num} samples per point, seed {a.seed}")
    configs = []
    if not a.no_ancestral:
        configs.append(("ancestral", "ancestral", {}, [run.diffusion.T]))
    configs.append(("DDIM", "ddim", {}, [int(k) for k in a.ddim_nfe.split(",")]))
    for order in (2, 3):
        for spacing in ("logsnr", "time"):
            configs.append((f"DPM-Solver++ {order}M {spacing}", "dpm-solver++", dict(order=order, spacing=spacing),
                            [int(k) for k in a.nfe.split(",")]))
    rows = []
    for label, sampler, kw, nfes in configs:
        for k in nfes:
            t0 = time.perf_counter()
            x = run.sample(a.num, sampler=sampler, steps=k, seed=a.seed, **kw)
            dt = time.perf_counter() - t0
            fd = fd_of(x)
            rows.append({"sampler": label, "nfe": k, "fd": round(fd, 4), "images_per_second": round(a.num / dt, 2)})
            print(f"{label:28s} NFE {k:5d}  {a.fd} {fd:8.3f}  {a.num / dt:8.1f} images/s", flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"run": a.run, "num_samples": a.num, "seed": a.seed,
                                                    "fd": a.fd, "rows": rows}, indent=2))
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(6.5, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for label in dict.fromkeys(r["sampler"] for r in rows):
        pts = [(r["nfe"], r["fd"]) for r in rows if r["sampler"] == label]
        if label == "ancestral":
            ax.axhline(pts[0][1], color="k", ls="--", label=f"ancestral, {pts[0][0]} steps")
            ax.axhline(1.1 * pts[0][1], color="k", ls=":", label="ancestral + 10 %")
        else:
            ax.plot(*zip(*pts, strict=True), marker="o", label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("network evaluations")
    ax.set_ylabel(a.fd)
    ax.set_title(f"{a.fd} of {a.num} samples vs network evaluations")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"))
    print(f"-> {out.with_suffix('.json')}, {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
