#!/usr/bin/env bash
# One prepared run on the GPU machine (docs/TRAINING.md, "Training on a lent GPU"): install the carried
# monai wheel, continue the shipped weights with configs/gpu_v03.json for MINUTES minutes, validate in
# the loop (cached validation arrays; no SimpleITK or ../shared there), and copy the checkpoint, the
# weights with their model card, the curves, validation.json and throughput.json to $OUT (8 files, the
# most the device tool brings back; optimizer moments stay behind).
#
# usage: scripts/gpu_train.sh [MINUTES]      (default 8)
# env:   CONFIG (configs/gpu_v03.json), DEVICE (cuda), RESUME (model_weights/checkpoint; empty: from scratch),
#        STEPS (override total_steps), CACHE (override the config's cache: scripts/gpu_bundle.sh's
#        .cache/gpu_bundle/train_arrays), RUN (working folder, .cache/gpu_run), OUT (results, runs/gpu_out),
#        BENCH_SECONDS (5: seconds per episode source of scripts/benchmark_episodes.py, into throughput.json; 0: skip)
set -euo pipefail
cd "$(dirname "$0")/.."
minutes=${1:-8}
config=${CONFIG:-configs/gpu_v03.json}
device=${DEVICE:-cuda}
resume=${RESUME-model_weights/checkpoint}
run=${RUN:-.cache/gpu_run}
out=${OUT:-runs/gpu_out}
export PYTHONUNBUFFERED=1 PYTHONPATH="WeakICLSegment${PYTHONPATH:+:$PYTHONPATH}"

if ! python3 -c "import monai" 2>/dev/null; then  # the GPU machine has torch but no monai
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$run/site" .cache/wheels/monai-*.whl
    export PYTHONPATH="$PYTHONPATH:$run/site"
fi
rm -rf "$run/checkpoint" "$run/episode_sources.json"
mkdir -p "$run"
if [ "${BENCH_SECONDS:-5}" != 0 ]; then
    python3 scripts/benchmark_episodes.py --config "$config" --device "$device" --seconds "${BENCH_SECONDS:-5}" \
        ${CACHE:+--cache "$CACHE"} > "$run/episode_sources.json"
fi
python3 -m weakicl.cli train --config "$config" --out "$run" --device "$device" --minutes "$minutes" \
    ${resume:+--resume "$resume"} ${STEPS:+--steps "$STEPS"} ${CACHE:+--cache "$CACHE"}

python3 - "$run" "${resume:-}" "$device" <<'PY'
import json, sys
from pathlib import Path

from weakicl.training.loop import hardware

run, resume, device = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
state = json.loads((run / "checkpoint" / "state.json").read_text())["state"]
start = {"step": 0, "episodes": 0, "seconds": 0.0}
if resume:
    folder = Path(resume) / "checkpoint" if (Path(resume) / "checkpoint").is_dir() else Path(resume)
    start = json.loads((folder / "state.json").read_text())["state"]
windows = [entry["episodes_per_s"] for entry in state["history"] if entry["step"] > start["step"]]
seconds = state["seconds"] - start["seconds"]
report = {
    "device": hardware(device), "steps": state["step"] - start["step"], "episodes": state["episodes"] - start["episodes"],
    "seconds": round(seconds, 1), "episodes_per_s": round((state["episodes"] - start["episodes"]) / max(seconds, 1e-9), 2),
    "median_logged_episodes_per_s": sorted(windows)[len(windows) // 2] if windows else None,
    "final_step": state["step"], "validation_dice": state["validation"][-1]["dice"] if state["validation"] else None,
}
if (run / "episode_sources.json").is_file():
    report["episode_sources"] = json.loads((run / "episode_sources.json").read_text())
(run / "throughput.json").write_text(json.dumps(report, indent=1) + "\n")
print("throughput:", json.dumps(report))
PY

mkdir -p "$out/checkpoint"
cp "$run"/checkpoint/{model.safetensors,ema.safetensors,state.json} "$out/checkpoint/"
cp "$run"/{weakicl.safetensors,weakicl.json,validation.json,throughput.json} "$out/"
[ -f "$run/curves.png" ] && cp "$run/curves.png" "$out/"
echo "results in $out"
