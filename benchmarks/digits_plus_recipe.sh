#!/usr/bin/env bash
# The recipe search for digits-hybvit-plus toward issue 6's target (pixel-FD <= 0.5, test accuracy >= 0.98, in
# 5 CPU-minutes): every row is `hybvit train --preset digits-hybvit-plus --minutes 5 --seed 0` with one change,
# then the EMA test accuracy and the pixel-space FD of 1000 DDIM-50 samples against the 360 test images (the
# end-of-run measure, train.fd_samples=1000). It first prints the floor of that measure: the FD of 1000 real
# training images against the same test images. About 5.5 minutes a row on 2 cores; one process at a time, on a
# quiet machine (a --minutes budget turns machine load into fewer steps). Results: docs/results/digits-plus-recipe.md
set -euo pipefail
OUT=${OUT:-runs/digits-plus-recipe}; mkdir -p "$OUT"
python - <<'PY'
import torch
from hybvit.data import load_data, to_float
from hybvit.evaluate.frechet import pixel_frechet_distance
d = load_data("digits")
fds = [pixel_frechet_distance(to_float(d.x_train[torch.randperm(len(d.x_train), generator=torch.Generator().manual_seed(s))[:1000]]),
                              d.x_test) for s in range(5)]
print(f"floor: 1000 real training images vs the test set, 5 draws: {', '.join(f'{f:.3f}' for f in fds)}")
PY
row() {
  name=$1; shift
  [ -f "$OUT/$name/metrics.json" ] || hybvit train --preset digits-hybvit-plus --minutes 5 --seed 0 --quiet \
      --set fd_samples=1000 --out "$OUT/$name" "$@" > "$OUT/$name.log" 2>&1
  python - "$OUT/$name/metrics.json" "$name" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
print(f"{sys.argv[2]:10s} steps {m['steps']:5d}  acc {m['test_accuracy']:.4f}  pixel-FD {m['pixel_fd']:.3f}  "
      f"train {m['train_seconds']:.0f} s")
PY
}
row base
row alpha100  --set alpha=100
row alpha30   --set alpha=30
row clip0     --set grad_clip=0
row strat     --set diffusion.t_sampling=stratified
row db256     --set diffusion_batch_size=256 --set batch_size=64
row p1d64     --set model.patch_size=1 --set model.dim=64 --set model.heads=4
row d192      --set model.dim=192 --set model.heads=6
row base10    --set minutes=10
