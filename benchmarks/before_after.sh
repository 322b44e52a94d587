#!/usr/bin/env bash
# The default digits run and digits-hybvit-plus (5 CPU-minutes, training seeds 0-2, balanced pixel-FD over sample
# seeds 0/100/200) with this checkout's src and with an earlier commit's, one run at a time on a quiet machine.
#   bash benchmarks/before_after.sh OLD_COMMIT OUT_DIR
# docs/results/official-alignment.md reports its output for OLD_COMMIT = dd191b8.
set -euo pipefail
old=$1; out=$(realpath -m "$2"); here=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"; git -C "$here" worktree add -f "$out/old-src" "$old" >/dev/null
for which in new old; do
  src=$here/src; [ "$which" = old ] && src=$out/old-src/src
  PYTHONPATH=$src python -m hybvit train --out "$out/$which-default" --quiet
done
for seed in 0 1 2; do
  for which in new old; do
    src=$here/src; [ "$which" = old ] && src=$out/old-src/src
    run=$out/$which-plus-s$seed
    PYTHONPATH=$src python -m hybvit train --preset digits-hybvit-plus --minutes 5 --seed "$seed" --out "$run" --quiet
    for s in 0 100 200; do
      PYTHONPATH=$src python -m hybvit evaluate --run "$run" --metrics pixel-fd --steps 50 --seed $s \
        --eps-scale 1.0075 --balance-classes --out "$run-fd$s.json" --no-html --quiet
    done
  done
done
git -C "$here" worktree remove --force "$out/old-src"
