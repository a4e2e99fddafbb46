#!/usr/bin/env bash
# Prepare what scripts/gpu_train.sh needs on the GPU machine, beside the working tree: the monai wheel
# in .cache/wheels/ (the machine has torch, scipy, safetensors and matplotlib, but no monai and no
# network) and the real-data cache .cache/train_arrays (`weakicl train --prepare`), copied to
# .cache/gpu_bundle/train_arrays less what would not fit beside the working tree in the device tool's
# 64 MiB (`weakicl.training.data.trim_cache`).
set -euo pipefail
cd "$(dirname "$0")/.."
limit=$((64 * 1024 * 1024))
version=$(python3 -c "from importlib.metadata import version; print(version('monai'))")
mkdir -p .cache/wheels
if ! ls .cache/wheels/monai-"$version"-*.whl >/dev/null 2>&1; then
    rm -f .cache/wheels/monai-*.whl  # one version only: two stop the install
    # pure-Python wheel: from the index (or pip's cache); offline, rebuild it from a source checkout
    # with `python3 -m pip wheel --no-deps --no-build-isolation -w .cache/wheels <monai source>`
    python3 -m pip download -q --no-deps --only-binary=:all: -d .cache/wheels "monai==$version"
fi
[ -f .cache/train_arrays/index.json ] || { echo "no .cache/train_arrays: run weakicl train --prepare first (docs/TRAINING.md)" >&2; exit 1; }
tree=$(git ls-files --cached --others --exclude-standard -z | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
wheels=$(du -sb .cache/wheels | awk '{print $1}')
# the cache, less training cases of its largest collection where the whole would not fit (1 MiB kept spare)
PYTHONPATH="WeakICLSegment${PYTHONPATH:+:$PYTHONPATH}" python3 -c "
import sys
from weakicl.training.data import trim_cache
dropped = trim_cache('.cache/train_arrays', '.cache/gpu_bundle/train_arrays', int(sys.argv[1]))
print('training cases left out to fit:', dropped or 'none')" $((limit - tree - wheels - 1024 * 1024))
carried=$(du -sb .cache/gpu_bundle .cache/wheels | awk '{s += $1} END {print s}')
total=$((tree + carried))
awk -v t="$tree" -v c="$carried" 'BEGIN {printf "working tree %.1f MiB + .cache/gpu_bundle and .cache/wheels %.1f MiB = %.1f MiB of 64 MiB\n", t / 2^20, c / 2^20, (t + c) / 2^20}'
[ "$total" -lt "$limit" ] || { echo "too large for the device tool: carry less" >&2; exit 1; }
echo 'carry=[".cache/gpu_bundle", ".cache/wheels"] and CACHE=.cache/gpu_bundle/train_arrays in the command'
