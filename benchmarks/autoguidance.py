"""Does autoguidance lower the pixel-FD of a digits-hybvit-plus run's class-balanced samples?

    hybvit train --preset digits-hybvit-plus --minutes 1 --seed 0 --set fd_samples=0 --out runs/bad
    python benchmarks/autoguidance.py --run runs/digits-plus --bad runs/bad --weights 1,1.2,1.3

Autoguidance (Karras et al. 2024, "Guiding a diffusion model with a bad version of itself") samples with
eps = eps_bad + w (eps_good - eps_bad): the extrapolation away from a weaker model of the same data (here the same
preset trained for a minute instead of five) removes the errors the two share. w = 1 is plain sampling. The guided
noise is then divided by --eps-scale and DDIM runs as `hybvit evaluate` runs it; the samples are class-balanced by
the good run's classifier exactly as `--balance-classes` does it (batches of 500 seeded seed + k). So w = 1 gives
the figures of `hybvit evaluate --run RUN --metrics pixel-fd --seed S --eps-scale 1.0075 --balance-classes`, and
every weight sees the same initial noise (paired comparison). Prints the pixel-FD against the test set per sample
seed and the samples' total pixel variance. A benchmark, not a test; nothing of it is in the package.
"""
from __future__ import annotations

import argparse

import torch

from hybvit.data import load_data
from hybvit.evaluate.frechet import pixel_frechet_distance
from hybvit.sample import eps_function, load_run


def balanced_guided(good, bad, w: float, n: int, seed: int, steps: int, eps_scale: float) -> torch.Tensor:
    D, cfg, K = good.diffusion, good.config.model, good.config.model.num_classes
    quota = [n // K + (c < n % K) for c in range(K)]
    kept, k = [], 0
    while sum(quota):
        if k > 40:
            raise SystemExit(f"after {k * 500} samples some class is still short; the guided model rarely draws it")
        eg = eps_function(good.model, D, "auto", "cpu")
        eb = eps_function(bad.model, D, "auto", "cpu")
        if w == 1:
            f = lambda x, t: eg(x, t) / eps_scale
        else:
            def f(x, t):
                e_bad = eb(x, t)
                return (e_bad + w * (eg(x, t) - e_bad)) / eps_scale
        x = D.sample(f, (500, cfg.channels, cfg.image_size, cfg.image_size), sampler="ddim", steps=steps, eta=0.0,
                     generator=torch.Generator().manual_seed(seed + k), device=torch.device("cpu"))
        x = x.float().clamp(-1, 1)
        for i, c in enumerate(good.model.classify(x).float().argmax(1).tolist()):
            if quota[c] > 0:
                quota[c] -= 1
                kept.append(x[i])
        k += 1
    return torch.stack(kept)


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="the good run")
    ap.add_argument("--bad", required=True, help="the weaker run of the same preset (the guide)")
    ap.add_argument("--weights", default="1,1.2,1.3")
    ap.add_argument("--seeds", default="0,100,200")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--eps-scale", type=float, default=1.0075)
    args = ap.parse_args()
    good, bad = load_run(args.run, device="cpu"), load_run(args.bad, device="cpu")
    if good.config.model.image_size != bad.config.model.image_size or good.config.data.spec != bad.config.data.spec:
        raise SystemExit("--run and --bad must be trained on the same data at the same image size")
    data = load_data(good.config.data.spec, good.config.data.image_size)
    seeds = [int(s) for s in args.seeds.split(",")]
    for w in (float(v) for v in args.weights.split(",")):
        fds, var = [], 0.0
        for s in seeds:
            x = balanced_guided(good, bad, w, args.n, s, args.steps, args.eps_scale)
            fds.append(pixel_frechet_distance(x, data.x_test))
            var += float(x.flatten(1).var(0).sum()) / len(seeds)
        print(f"w {w:g}: pixel-FD {' / '.join(f'{v:.3f}' for v in fds)}, mean {sum(fds) / len(fds):.3f}; "
              f"total pixel variance {var:.2f}", flush=True)


if __name__ == "__main__":
    main()
