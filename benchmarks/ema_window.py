"""How long should the EMA average? Train once and keep several EMAs side by side, then score each.

    python benchmarks/ema_window.py --out runs/ema-window --seed 0        # digits-hybvit-plus, 5 minutes

The trainer's EMA (train.ema_warmup) uses the decay d = min(ema_decay, (1 + s) / (10 + s)) at step s. In a run of
~1500 steps that cap is always below 0.999, so the warm-up formula alone sets the averaging window: it weights step
s' by about (s'/s)^9, roughly the last 10 % of the run. This script adds EMAs with (1 + s) / (c + s) for other c
(smaller c: a longer window) to one training run, then draws 1000 samples from each with the issue-6 sampling
(`--eps-scale 1.0075 --balance-classes`, DDIM-50, sample seeds 0/100/200) and prints the pixel-FD against the
test set. The extra EMAs cost a little time each step, so the run fits slightly fewer steps than a plain one.
A benchmark, not a test.
"""
from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

import hybvit.train as trainer
from hybvit.config import preset_config
from hybvit.data import load_data
from hybvit.evaluate.frechet import pixel_frechet_distance
from hybvit.sample import draw_balanced, load_run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", default="digits-hybvit-plus")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--windows", default="3,5,20,40", help="the c of each extra EMA (the trainer's own is 10)")
    args = ap.parse_args()
    cs = [float(c) for c in args.windows.split(",")]
    extra: dict[float, torch.nn.Module] = {}

    class SideBySideEMA(trainer.EMA):
        def __init__(self, model, decay, warmup=False):
            super().__init__(model, decay, warmup)
            extra.update({c: copy.deepcopy(self.model) for c in cs})

        @torch.no_grad()
        def update(self, model, step):
            super().update(model, step)
            src = [p.detach() for p in model.parameters()]
            for c, m in extra.items():
                torch._foreach_lerp_(list(m.parameters()), src, 1 - (1 + step) / (c + step))

    trainer.EMA = SideBySideEMA
    cfg = preset_config(args.preset)
    t = cfg.train
    t.minutes, t.steps, t.epochs, t.seed, t.fd_samples = args.minutes, 0, 0.0, args.seed, 0
    data = load_data(cfg.data.spec, cfg.data.image_size)
    m = trainer.train(cfg, data, Path(args.out), progress=False)
    print(f"{args.preset}, seed {args.seed}: {m['steps']} steps in {args.minutes:g} minutes, "
          f"test accuracy {m['test_accuracy']:.4f} (EMA c = 10)")
    run = load_run(args.out, device="cpu")
    for c, model in {10.0: run.model, **extra}.items():
        model.eval()
        fds = [pixel_frechet_distance(draw_balanced(model, run.diffusion, 1000, seed=s, eps_scale=1.0075), data.x_test)
               for s in (0, 100, 200)]
        print(f"EMA (1 + s) / ({c:g} + s): pixel-FD {' / '.join(f'{f:.3f}' for f in fds)}, mean {sum(fds) / 3:.3f}",
              flush=True)


if __name__ == "__main__":
    main()
