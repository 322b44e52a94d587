#!/usr/bin/env bash
# cifar10-hybvit-small-plus for a fixed number of steps (seed 0) with this checkout's src and with an earlier
# commit's, then small-fd (1000 DDIM-50 samples) and test accuracy; one run at a time on a quiet machine.
# A fixed step count makes the weights independent of the machine's speed on the day.
#   bash benchmarks/before_after_cifar.sh OLD_COMMIT CIFAR_DIR OUT_DIR [STEPS]
# docs/results/official-alignment.md reports its output for OLD_COMMIT = dd191b8, STEPS = 1124.
set -euo pipefail
old=$1; data=$(realpath "$2"); out=$(realpath -m "$3"); steps=${4:-1124}; here=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"; git -C "$here" worktree add -f "$out/old-src" "$old" >/dev/null
for which in old new; do
  src=$here/src; [ "$which" = old ] && src=$out/old-src/src
  run=$out/$which-small-plus
  PYTHONPATH=$src python -m hybvit train --preset cifar10-hybvit-small-plus --data "folder:$data" --steps "$steps" \
    --seed 0 --out "$run" --quiet
  PYTHONPATH=$src python -m hybvit evaluate --run "$run" --metrics small-fd --num-samples 1000 --steps 50 \
    --out "$run/fd.json" --no-html --quiet
done
git -C "$here" worktree remove --force "$out/old-src"
