#!/usr/bin/env bash
# A lent GPU's whole session in one call (docs/TRAINING.md, "Training on a lent GPU"): first the engine
# benchmark on the GPU (128x256x256 with 100 new volumes; 256³ with a cProfile table of a whole volume and
# a correction, then 256³ profiled with blocking kernel launches), then scripts/gpu_train.sh for MINUTES
# minutes (falling back to CPU-drawn episodes if the device-drawn ones fail); packs the results into the
# 8 files the device tool brings back:
#   $OUT/checkpoint/{model,ema}.safetensors, state.json; $OUT/weakicl.{safetensors,json};
#   $OUT/results.tar.gz (validation.json, throughput.json, curves.png, engine_cuda*.json, profile, nvidia-smi, logs).
# Each part runs under its own timeout, so one failing part leaves the others' results.
#
# usage: OUT=folder scripts/gpu_session.sh [MINUTES]     (default 4; 0: benchmarks only; the call needs about MINUTES + 4.5 min)
# env:   DEVICE (cuda), BENCH_TIMEOUT (100 s per benchmark), WORK (.cache/gpu_session), and gpu_train.sh's CONFIG, RESUME
set -uo pipefail
cd "$(dirname "$0")/.."
minutes=${1:-4}
out=${OUT:?set OUT to the results folder}
work=${WORK:-.cache/gpu_session}
rm -rf "$work" && mkdir -p "$work/results"
export PYTHONUNBUFFERED=1 PYTHONPATH="WeakICLSegment${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi > "$work/results/nvidia-smi.txt" 2>&1

bench() {  # the engine benchmark on the device, under its own timeout
    timeout "${BENCH_TIMEOUT:-100}" python3 scripts/benchmark_engine.py --device "${DEVICE:-cuda}" --threads 16 \
        --no-growcut --no-registration "$@" >> "$work/results/engine.log" 2>&1
}
if ! python3 -c "import monai" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$work/site" .cache/wheels/monai-*.whl
    export PYTHONPATH="$PYTHONPATH:$work/site"
fi
bench --shapes 128x256x256 --batch-volumes 100 --out "$work/results/engine_cuda.json"
bench --shapes 256x256x256 --batch-volumes 5 --profile "$work/results/profile_cuda_256.txt" --out "$work/results/engine_cuda_256.json"
# every kernel waits for its launch to finish: the profile then charges device time to the step that spent it
CUDA_LAUNCH_BLOCKING=1 bench --shapes 256x256x256 --batch-volumes 0 --profile "$work/results/profile_cuda_256_blocking.txt" \
    --out "$work/results/engine_cuda_256_blocking.json"
tail -n 5 "$work/results/engine.log"

train_seconds=$(python3 -c "print(int($minutes * 60 + 120))")
started=$SECONDS
if [ "$minutes" = 0 ]; then
    echo "MINUTES 0: the benchmarks only" > "$work/results/train.log"
elif ! OUT="$work/train" RUN="$work/run" timeout "$train_seconds" scripts/gpu_train.sh "$minutes" > "$work/results/train.log" 2>&1 \
        && (( SECONDS - started < 120 )); then  # a quick failure leaves time for a second try
    echo "device-drawn training failed; CPU-drawn episodes instead" | tee -a "$work/results/train.log"
    python3 -c "import json; c = json.load(open('${CONFIG:-configs/gpu_v03.json}')); c['device_synthetic_fraction'] = 0.0; \
c['episodes']['synthetic_fraction'] = 0.4; json.dump(c, open('$work/fallback.json', 'w'))"
    CONFIG="$work/fallback.json" BENCH_SECONDS=0 OUT="$work/train" RUN="$work/run" \
        timeout "$train_seconds" scripts/gpu_train.sh "$(python3 -c "print($minutes * 0.6)")" >> "$work/results/train.log" 2>&1
fi
tail -n 30 "$work/results/train.log"

mkdir -p "$out/checkpoint"
for name in model.safetensors ema.safetensors state.json; do
    [ -f "$work/train/checkpoint/$name" ] && cp "$work/train/checkpoint/$name" "$out/checkpoint/"
done
for name in weakicl.safetensors weakicl.json; do [ -f "$work/train/$name" ] && cp "$work/train/$name" "$out/"; done
for name in validation.json throughput.json curves.png; do [ -f "$work/train/$name" ] && cp "$work/train/$name" "$work/results/"; done
tar -czf "$out/results.tar.gz" -C "$work" results
ls -la "$out" "$out/checkpoint"
