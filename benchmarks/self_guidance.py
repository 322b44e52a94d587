"""Self-guided class-conditional sampling against guidance scale.

    python benchmarks/self_guidance.py --run runs/digits --out docs/results/self-guidance-digits
    python benchmarks/self_guidance.py --run runs/cifar --judge cnn --fd small-fd --per-class 50 \
        --out docs/results/self-guidance-cifar10

For each guidance scale and class K, draws --per-class samples steered to K (DDIM-50, same seeds for every scale)
and reports (1) the fraction that an independent classifier, trained here and never seen by the HybViT, assigns to
K, and (2) the Frechet distance of the class-K samples to the class-K real images (pixel space, or the fixed
random-CNN features with --fd small-fd), averaged over classes; against the test images of class K and, a steadier
estimate where the test split is small (digits: 36 per class), against the training images of class K. The
unguided reference: the same number of unguided samples, grouped by the judge's label. --through picks how the
guidance gradient is taken (hybvit.guidance). Writes OUT.json, OUT.md and OUT-grid.png (a row per class).
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from hybvit.data import to_float, to_uint8
from hybvit.datasets import load_data
from hybvit.evaluate.fid import SmallFeatures, extract
from hybvit.evaluate.frechet import frechet_distance
from hybvit.guidance import sample_class
from hybvit.sample import load_run, make_grid, save_png


def train_judge(data, kind: str, steps: int, seed: int):
    """An independent classifier: logistic regression on pixels (sklearn) or a small CNN trained here."""
    if kind == "logreg":
        from sklearn.linear_model import LogisticRegression
        clf = LogisticRegression(max_iter=3000, C=0.1).fit(to_float(data.x_train).flatten(1).numpy(),
                                                            data.y_train.numpy())
        return lambda x: torch.from_numpy(clf.predict(x.flatten(1).numpy()))
    torch.manual_seed(seed)
    C = data.channels
    net = torch.nn.Sequential(
        torch.nn.Conv2d(C, 64, 3, padding=1), torch.nn.BatchNorm2d(64), torch.nn.ReLU(),
        torch.nn.Conv2d(64, 128, 3, padding=1, stride=2), torch.nn.BatchNorm2d(128), torch.nn.ReLU(),
        torch.nn.Conv2d(128, 256, 3, padding=1, stride=2), torch.nn.BatchNorm2d(256), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(256, data.num_classes))
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=5e-4)
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    net.train()
    for step in range(steps):                     # a fixed number of steps: the same judge on every machine
        idx = torch.randint(0, len(data.x_train), (128,), generator=g)
        x = to_float(data.x_train[idx])
        if torch.rand(1, generator=g) < 0.5:
            x = x.flip(3)
        loss = F.cross_entropy(net(x), data.y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()

    @torch.no_grad()
    def predict(x):
        return torch.cat([net(x[i:i + 500]).argmax(1) for i in range(0, len(x), 500)])
    print(f"judge CNN: {steps} steps in {time.time() - t0:.0f} s")
    return predict


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--run", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--scales", default="0,1,2,4,8")
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--judge", default="logreg", choices=["logreg", "cnn"])
    p.add_argument("--judge-steps", type=int, default=3000, help="training steps of the CNN judge (batch 128)")
    p.add_argument("--fd", default="pixel-fd", choices=["pixel-fd", "small-fd"])
    p.add_argument("--grid-scale", type=float, default=None, help="scale shown in the grid (default: the best)")
    p.add_argument("--through", default="denoiser", choices=["denoiser", "classifier"])
    p.add_argument("--eta", type=float, default=1.0,
                   help="DDIM eta for guided and unguided samples (1, the default: stochastic, ancestral-like)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    run = load_run(a.run, device="cpu")
    data = load_data(run.config.data.spec, run.config.data.image_size)
    K = data.num_classes
    judge = train_judge(data, a.judge, a.judge_steps, a.seed)
    judge_acc = float((judge(to_float(data.x_test)) == data.y_test).float().mean())
    print(f"independent judge ({a.judge}) test accuracy {judge_acc:.4f}")
    ext = SmallFeatures() if a.fd == "small-fd" else None
    feats = (lambda x: extract(ext, to_uint8(x), "cpu")) if ext else (lambda x: to_float(to_uint8(x)).flatten(1).numpy())
    test_feats, train_feats = feats(to_float(data.x_test)), feats(to_float(data.x_train))

    def class_fd(x, k, split="test"):
        if split == "train":
            return frechet_distance(feats(x), train_feats[(data.y_train == k).numpy()])
        return frechet_distance(feats(x), test_feats[(data.y_test == k).numpy()])

    rows, grids = [], {}
    # unguided reference: K * per_class samples, grouped by the judge's label
    t0 = time.time()
    x = run.sample(K * a.per_class, steps=a.steps, seed=a.seed, eta=a.eta)
    lab = judge(x)
    unguided_fd = [class_fd(x[lab == k], k) for k in range(K) if (lab == k).sum() > 2]
    unguided_fd_train = [class_fd(x[lab == k], k, "train") for k in range(K) if (lab == k).sum() > 2]
    overall = frechet_distance(feats(x), test_feats)
    ref = {"scale": "unguided", "in_class": None, "per_class_fd": round(float(np.mean(unguided_fd)), 4),
           "per_class_fd_train": round(float(np.mean(unguided_fd_train)), 4),
           "overall_fd": round(overall, 4), "judged_class_counts": torch.bincount(lab, minlength=K).tolist(),
           "seconds": round(time.time() - t0, 1)}
    print(json.dumps(ref), flush=True)
    for s in [float(v) for v in a.scales.split(",")]:
        t0 = time.time()
        xs = [sample_class(run, k, a.per_class, scale=s, steps=a.steps, seed=a.seed + 1000 * k, through=a.through,
                           eta=a.eta) for k in range(K)]
        hit = [float((judge(xk) == k).float().mean()) for k, xk in enumerate(xs)]
        fds = [class_fd(xk, k) for k, xk in enumerate(xs)]
        fds_train = [class_fd(xk, k, "train") for k, xk in enumerate(xs)]
        row = {"scale": s, "in_class": round(float(np.mean(hit)), 4), "in_class_per_class": [round(h, 3) for h in hit],
               "per_class_fd": round(float(np.mean(fds)), 4), "per_class_fds": [round(f, 3) for f in fds],
               "per_class_fd_train": round(float(np.mean(fds_train)), 4),
               "seconds": round(time.time() - t0, 1)}
        rows.append(row)
        grids[s] = torch.cat([xk[:10] for xk in xs])
        print(json.dumps(row), flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    best = a.grid_scale if a.grid_scale is not None else max(
        (r for r in rows if r["per_class_fd"] <= 1.5 * ref["per_class_fd"]), key=lambda r: r["in_class"],
        default=rows[-1])["scale"]
    save_png(out.with_name(out.name + "-grid.png"), make_grid(grids[best], nrow=10))
    out.with_suffix(".json").write_text(json.dumps({"run": a.run, "judge": a.judge, "judge_test_accuracy": judge_acc,
                                                    "fd": a.fd, "per_class": a.per_class, "steps": a.steps,
                                                    "through": a.through, "eta": a.eta,
                                                    "unguided": ref, "rows": rows, "grid_scale": best}, indent=2))
    lines = [f"| guidance scale | samples in the requested class | mean per-class {a.fd}, test images (x unguided) "
             f"| same, training images (x unguided) |", "|---:|---:|---:|---:|",
             f"| unguided (grouped by the judge) | - | {ref['per_class_fd']:.3f} | {ref['per_class_fd_train']:.3f} |"]
    lines += [f"| {r['scale']:g} | {r['in_class']:.3f} | {r['per_class_fd']:.3f} "
              f"({r['per_class_fd'] / ref['per_class_fd']:.2f}) | {r['per_class_fd_train']:.3f} "
              f"({r['per_class_fd_train'] / ref['per_class_fd_train']:.2f}) |" for r in rows]
    out.with_suffix(".md").write_text(
        f"# Self-guided sampling: {a.run}\n\n`python benchmarks/self_guidance.py {' '.join(sys.argv[1:])}`"
        f"\n\nJudge: {a.judge}, test accuracy {judge_acc:.4f}; {a.per_class} samples per class, DDIM-{a.steps} "
        f"(eta {a.eta:g}); guidance gradient through the {a.through}.\n\n"
        + "\n".join(lines) + f"\n\nGrid (row = requested class): scale {best:g}.\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
