#!/usr/bin/env bash
# A short check on a lent GPU, about 6-8 minutes on one H100 (no install needed beyond torch, torchvision, scipy,
# scikit-learn, safetensors, tensorboard, tqdm, matplotlib): step throughput and MFU per mode at the paper's CIFAR-10
# config (bf16 and fp32; SDPA; torch.compile off and on; the joint CE + diffusion pass), peak memory, sampling
# images/s per sampler, the augmentation pipeline, the CUDA/bf16 training path on digits, and the test suite under
# that machine's torch. Results go to $OUT (or ./gpu-check) as text.
#   OUT=$OUT bash benchmarks/gpu_check.sh
set -uo pipefail
OUT=${OUT:-gpu-check}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python -c "import torch; print('torch', torch.__version__)"
  echo "== train step, bf16 autocast, eager, with sampler timings"
  timeout 150 python benchmarks/train_step.py --device cuda --amp bf16 --steps 20 --warmup 5 --sampling --reference
  echo "== train step, bf16, joint CE + diffusion pass"
  timeout 60 python benchmarks/train_step.py --device cuda --amp bf16 --steps 20 --warmup 5 --modes hybvit --joint
  echo "== train step, bf16, torch.compile"
  timeout 150 python benchmarks/train_step.py --device cuda --amp bf16 --steps 20 --warmup 5 --compile
  echo "== train step, fp32"
  timeout 60 python benchmarks/train_step.py --device cuda --amp fp32 --steps 10 --warmup 3
  echo "== augmentation: CPU loader vs GPU-resident batched path"
  timeout 60 python benchmarks/augment_throughput.py --workers 8
  echo "== the default digits run (hybvit, no arguments) on CUDA (bf16)"
  timeout 120 python -m hybvit train --out "$OUT/digits-cuda" --quiet
  cat "$OUT/digits-cuda/metrics.json"
  echo "== test suite"; timeout 200 python -m pytest -q -x tests 2>&1 | tail -5
} 2>&1 | tee "$OUT/gpu-check.txt"
