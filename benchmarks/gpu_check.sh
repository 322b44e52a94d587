#!/usr/bin/env bash
# A short check on a lent GPU, about 6-8 minutes on one H100/H200 (no install needed beyond torch, torchvision, scipy,
# scikit-learn, safetensors, tensorboard, tqdm, pytest): step throughput and MFU per mode at the paper's CIFAR-10
# config (bf16 and fp32; SDPA; eager, torch.compile and torch.compile with CUDA graphs; the joint CE + diffusion
# pass; batch 128 and 512 per branch), peak memory, sampling images/s per sampler, the augmentation pipeline, the
# default digits run on CUDA (eager, and compiled with CUDA graphs through the trainer), and the test suite under that
# machine's torch (in the background on the other half of the cores, GPU hidden, so it does not disturb the timings).
# Results go to $OUT (or ./gpu-check) as text, written as they come (a cut-off run still leaves its part).
#   OUT=$OUT bash benchmarks/gpu_check.sh
set -uo pipefail
OUT=${OUT:-gpu-check}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
N=$(nproc); H=$((N / 2))
PIN=(); TPIN=()
if command -v taskset >/dev/null && [ "$N" -ge 4 ]; then PIN=(taskset -c 0-$((H - 1))); TPIN=(taskset -c $H-$((N - 1))); fi
(CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=4 timeout 400 "${TPIN[@]}" python -m pytest -q -p no:cacheprovider tests \
   > "$OUT/tests.txt" 2>&1; echo "exit $?" >> "$OUT/tests.txt") &
TESTS=$!
step() { timeout "$1" "${PIN[@]}" python benchmarks/train_step.py --device cuda "${@:2}"; }
{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python -c "import torch; print('torch', torch.__version__)"
  echo "== eager, bf16 autocast, every mode, with the reference-style fp32 step and the samplers"
  step 120 --amp bf16 --steps 20 --warmup 5 --reference --sampling
  echo "== eager, bf16, hybvit with the joint CE + diffusion pass, batch 128 and 512 per branch"
  step 60 --amp bf16 --steps 20 --warmup 5 --modes hybvit --joint --batch-size 128,512
  echo "== torch.compile mode=reduce-overhead (CUDA graphs), bf16, every mode (hybvit joint)"
  step 200 --amp bf16 --steps 30 --warmup 5 --joint --compile --compile-mode reduce-overhead
  echo "== eager, fp32 (no TF32)"
  step 45 --amp fp32 --steps 10 --warmup 3
  echo "== the default digits run (hybvit, no arguments) on CUDA (bf16)"
  timeout 90 "${PIN[@]}" python -m hybvit train --out "$OUT/digits-cuda" --quiet
  cat "$OUT/digits-cuda/metrics.json"
  echo "== the same, compiled (on CUDA: CUDA graphs and the joint pass)"
  timeout 120 "${PIN[@]}" python -m hybvit train --out "$OUT/digits-cuda-graphs" --quiet --set train.compile=true
  cat "$OUT/digits-cuda-graphs/metrics.json"
  echo "== torch.compile (default mode), bf16, hybvit joint"
  step 100 --amp bf16 --steps 20 --warmup 5 --modes hybvit --joint --compile
  echo "== augmentation: CPU loader vs GPU-resident batched path"
  timeout 60 "${PIN[@]}" python benchmarks/augment_throughput.py --workers 8
  echo "== torch.compile mode=reduce-overhead, bf16, hybvit joint, batch 512 per branch"
  step 90 --amp bf16 --steps 20 --warmup 5 --modes hybvit --joint --compile --compile-mode reduce-overhead --batch-size 512
} 2>&1 | tee "$OUT/gpu-check.txt"
wait $TESTS                                   # a child of this shell, not of the piped group above
{ echo "== test suite (torch of this machine, GPU hidden, on CPUs $H-$((N - 1)))"; tail -3 "$OUT/tests.txt"; } \
  | tee -a "$OUT/gpu-check.txt"
