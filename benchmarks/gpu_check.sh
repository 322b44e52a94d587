#!/usr/bin/env bash
# A short check on a lent GPU (no install needed beyond torch, torchvision, scipy, scikit-learn, safetensors,
# tensorboard, tqdm): step throughput at the paper's CIFAR-10 config, the CUDA/bf16 training path on digits,
# and the test suite under that machine's torch. Results go to $OUT (or ./gpu-check) as text.
set -uo pipefail
OUT=${OUT:-gpu-check}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python -c "import torch; print('torch', torch.__version__)"
  echo "== train step, bf16 autocast"; python benchmarks/train_step.py --device cuda --amp bf16 --steps 20 --warmup 5
  echo "== train step, fp32"; python benchmarks/train_step.py --device cuda --amp fp32 --steps 10 --warmup 3
  echo "== augmentation: CPU loader vs GPU-resident batched path"; python benchmarks/augment_throughput.py --workers 8
  echo "== the default digits run (hybvit, no arguments) on CUDA (bf16)"
  python -m hybvit train --out "$OUT/digits-cuda" --quiet
  cat "$OUT/digits-cuda/metrics.json"
  echo "== test suite"; python -m pytest -q -x tests 2>&1 | tail -5
} 2>&1 | tee "$OUT/gpu-check.txt"
