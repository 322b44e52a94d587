"""Where a digits run's pixel-FD comes from: the parts of the FD, the pixel histogram, and how much each stretch of
the noise range costs (issue 6's digits target, docs/results/digits-plus-recipe.md).

    python benchmarks/digits_fd_diagnostics.py --run runs/digits-plus-recipe/base

Prints, for 1000 DDIM-50 samples of the run (sample seed 0, batch 1000):
  * the FD against the test set split into its mean term ||mu_s - mu_t||^2 and covariance term, beside the same
    parts for 1000 real training images (the floor), and the total pixel variance (trace of the covariance);
  * the share of pixels in value bins, samples against the training images (softness shows as mass moved from
    the ends, -1 and 1, toward the middle);
  * "re-noise and denoise" (SDEdit-style): 1000 training images noised to step t_start and brought back with the
    run's deterministic DDIM on the steps of a 50-step schedule below t_start. Starting at 0 gives the training
    images back; at T-1 it is plain sampling. The FD and total variance at each t_start show which noise levels
    lose the data's structure (a perfect denoiser would keep the floor at every t_start);
  * with --fine K: the same from a few t_start with K steps each, to tell model error from discretisation error.
"""
from __future__ import annotations

import argparse
import warnings

import numpy as np
import scipy.linalg
import torch

from hybvit.data import load_data, to_float, to_uint8
from hybvit.evaluate.frechet import pixel_frechet_distance
from hybvit.sample import draw_samples, eps_function, load_run


def parts(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    """(mean term, covariance term, trace of a's covariance) of the FD between image sets a and b."""
    a = a.flatten(1).double().numpy()
    b = b.flatten(1).double().numpy()
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with warnings.catch_warnings():                  # constant border pixels: singular covariances are normal
        warnings.simplefilter("ignore")
        cov = float(np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real))
    return float(((a.mean(0) - b.mean(0)) ** 2).sum()), cov, float(np.trace(s1))


@torch.no_grad()
def renoise_denoise(run, x0: torch.Tensor, t_start: int, steps: list[int], g: torch.Generator) -> torch.Tensor:
    diffusion = run.diffusion
    eps = eps_function(run.model, diffusion, run.config.train.amp, run.device)
    t = torch.full((len(x0),), t_start, dtype=torch.long)
    x = diffusion.q_sample(x0, t, torch.randn(x0.shape, generator=g))
    ts = [t_start] + [s for s in steps if s < t_start]
    for now, nxt in zip(ts, [*ts[1:], -1]):
        x = diffusion.ddim_step(x, eps(x, torch.full((len(x0),), now, dtype=torch.long)), now, nxt)
    return x.clamp(-1, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="a digits run directory")
    ap.add_argument("--fine", type=int, default=0, help="also re-noise/denoise with this many steps per t_start")
    args = ap.parse_args()
    run = load_run(args.run)
    data = load_data("digits")
    test = to_float(data.x_test)
    g = torch.Generator().manual_seed(0)
    train = to_float(data.x_train[torch.randperm(len(data.x_train), generator=g)[:1000]])
    x = to_float(to_uint8(draw_samples(run.model, run.diffusion, 1000, steps=50, seed=0, batch_size=1000,
                                       amp=run.config.train.amp)))

    print(f"run {args.run}: 1000 DDIM-50 samples (seed 0) against the {len(test)} test images")
    print(f"{'':28s} {'FD':>6s} {'mean term':>10s} {'cov term':>9s} {'total variance':>15s}")
    for name, a in (("samples", x), ("1000 training images", train)):
        m, c, tr = parts(a, test)
        print(f"{name:28s} {pixel_frechet_distance(a, data.x_test):6.3f} {m:10.3f} {c:9.3f} {tr:15.2f}")
    print(f"{'test images':28s} {'':6s} {'':10s} {'':9s} {parts(test, test)[2]:15.2f}")

    edges = [-1.01, -0.95, -0.5, 0.0, 0.5, 0.95, 1.01]
    hist = lambda a: np.histogram(a.flatten().numpy(), bins=edges)[0] / a.numel()
    labels = ["[-1,-0.95)", "[-0.95,-0.5)", "[-0.5,0)", "[0,0.5)", "[0.5,0.95)", "[0.95,1]"]
    print("\nshare of pixels per value bin")
    print(f"{'':22s}" + "".join(f"{b:>14s}" for b in labels))
    for name, a in (("samples", x), ("1000 training images", train)):
        print(f"{name:22s}" + "".join(f"{v:14.3f}" for v in hist(a)))

    steps = run.diffusion.ddim_timesteps(50)
    T = run.diffusion.T
    print("\nre-noise 1000 training images to t_start, denoise with DDIM (the 50-step schedule below t_start)")
    print(f"{'t_start':>8s} {'steps':>6s} {'FD':>7s} {'total variance':>15s}")
    for t0 in (0, 100, 250, 400, 550, 700, 850, T - 1):
        y = renoise_denoise(run, train, t0, steps, torch.Generator().manual_seed(1))
        n = 1 + sum(s < t0 for s in steps)
        print(f"{t0:8d} {n:6d} {pixel_frechet_distance(y, data.x_test):7.3f} {parts(y, test)[2]:15.2f}", flush=True)
    if args.fine:
        print(f"\nthe same with {args.fine} evenly spaced steps below each t_start (discretisation error removed)")
        for t0 in (100, 250, T - 1):
            fine = list(range(t0, -1, -max(1, t0 // args.fine)))
            y = renoise_denoise(run, train, t0, fine, torch.Generator().manual_seed(1))
            print(f"{t0:8d} {len(fine):6d} {pixel_frechet_distance(y, data.x_test):7.3f} {parts(y, test)[2]:15.2f}",
                  flush=True)


if __name__ == "__main__":
    main()
