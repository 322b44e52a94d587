"""Does dropping the samples a HybViT's own classifier is unsure of lower the pixel-FD of class-balanced samples?

    python benchmarks/confidence_filter.py --run runs/digits-plus

Draws a pool of samples (DDIM-50, --eps-scale 1.0075, batches seeded 0, 1, 2, ... as `--balance-classes` draws
them), labels each with the run's classifier, and for each confidence threshold tau keeps, class by class, the
first n / K samples whose top probability is at least tau (tau 0 is exactly `--balance-classes`). Three
selections per tau start at different places in the pool. Prints the fraction kept and the pixel-FD against the
test set. A benchmark, not a test.
"""
from __future__ import annotations

import argparse

import torch

from hybvit.data import load_data
from hybvit.evaluate.frechet import pixel_frechet_distance
from hybvit.sample import draw_samples, load_run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--pool", type=int, default=4000)
    ap.add_argument("--taus", default="0,0.5,0.7,0.9,0.95,0.99")
    args = ap.parse_args()
    run = load_run(args.run, device="cpu")
    data = load_data(run.config.data.spec, run.config.data.image_size)
    K = run.config.model.num_classes
    pool, probs = [], []
    for k in range(-(-args.pool // 500)):
        x = draw_samples(run.model, run.diffusion, 500, seed=k, device="cpu", eps_scale=1.0075)
        with torch.no_grad():
            probs.append(run.model.classify(x).float().softmax(1))
        pool.append(x)
    x, p = torch.cat(pool), torch.cat(probs)
    conf, label = p.max(1)

    def select(keep: torch.Tensor, start: int) -> torch.Tensor:
        quota, kept = [args.n // K] * K, []
        for i in [*range(start, len(x)), *range(start)]:
            if keep[i] and quota[label[i]] > 0:
                quota[label[i]] -= 1
                kept.append(i)
        if sum(quota):
            raise SystemExit(f"the pool of {len(x)} holds too few confident samples of some class; raise --pool")
        return x[kept]

    starts = (0, len(x) // 3, 2 * len(x) // 3)
    for tau in (float(v) for v in args.taus.split(",")):
        keep = conf >= tau
        fds = [pixel_frechet_distance(select(keep, s), data.x_test) for s in starts]
        print(f"tau {tau:.2f}: kept {keep.float().mean():.3f} of the pool, pixel-FD "
              f"{' / '.join(f'{f:.3f}' for f in fds)}, mean {sum(fds) / 3:.3f}", flush=True)


if __name__ == "__main__":
    main()
