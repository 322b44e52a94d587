#!/usr/bin/env bash
# Reruns every row of the table in docs/results/digits-default.md: each row is one `hybvit train` run on the bundled
# digits (CPU, 2 threads), printing the EMA test accuracy and the pixel-space Frechet distance of 1000 DDIM-50
# samples to the test set. About 4 minutes a row on 2 cores (about an hour in all); run it on a quiet machine.
# Accuracy and FD are deterministic for a seed on the CPU; only the seconds depend on the machine.
set -euo pipefail
OUT=${OUT:-runs/digits-default-table}; mkdir -p "$OUT"
row() {
  name=$1; shift
  hybvit train --quiet --out "$OUT/$name" "$@" > "$OUT/$name.log" 2>&1
  python - "$OUT/$name/metrics.json" "$name" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
fd = f"{m['pixel_fd']:.3f}" if "pixel_fd" in m else "-"
print(f"{sys.argv[2]:26s} steps {m['steps']:5d}  acc {m.get('test_accuracy', float('nan')):.4f}  "
      f"raw {m.get('test_accuracy_raw', float('nan')):.4f}  pixel-FD {fd}  train {m['train_seconds']:.0f} s  "
      f"wall {m['wall_seconds']:.0f} s")
PY
}
row faithful-800          --steps 800  --set diffusion.loss=l1 --set alpha=100 --set ema_warmup=false
row emawarmup-l1-800      --steps 800  --set diffusion.loss=l1 --set alpha=100
row emawarmup-l1-1000     --steps 1000 --set diffusion.loss=l1 --set alpha=100
row l2-a100-850           --steps 850  --set alpha=100
row l2-a100-1000-seed0    --steps 1000 --set alpha=100
row l2-a100-1000-seed1    --steps 1000 --set alpha=100 --seed 1
row l2-a100-1000-seed2    --steps 1000 --set alpha=100 --seed 2
row l2-a100-850-crop1     --steps 850  --set alpha=100 --set data.crop_padding=1
row l2-a100-850-ls        --steps 850  --set alpha=100 --set label_smoothing=0.1
row l2-a100-d96-1400-s1   --steps 1400 --set alpha=100 --set model.dim=96 --seed 1
row l2-a10-850            --steps 850
row l2-a10-900            --steps 900
row default-seed0         --seed 0
row default-seed1         --seed 1
row default-seed2         --seed 2
row vit-1000              --mode vit
