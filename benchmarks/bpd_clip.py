"""Bits/dim of a digits run's test set with and without the clamp of the predicted x0 (the same noise draws).

    python benchmarks/bpd_clip.py RUN_DIR

The paper's code computes its Table 4 with the clamp (clip_denoised=True), which `hybvit evaluate --metrics bpd`
does; this prints both, for docs/results/official-alignment.md.
"""
import sys

import torch

from hybvit.data import to_float
from hybvit.datasets import load_data
from hybvit.likelihood import bits_per_dim
from hybvit.sample import eps_function, load_run

run = load_run(sys.argv[1], device="cpu")
x0 = to_float(load_data("digits").x_test)
eps = eps_function(run.model, run.diffusion, run.config.train.amp, run.device)
with torch.no_grad():
    for clip in (True, False):
        r = bits_per_dim(run.diffusion, eps, x0, torch.Generator().manual_seed(0), clip=clip)
        print(f"clip={clip}: {r['total'].mean().item():.4f} bits/dim (prior {r['prior'].mean():.4f}, "
              f"decoder {r['decoder'].mean():.4f}, KL terms {r['kl_sum'].mean():.4f})")
