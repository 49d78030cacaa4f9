#!/usr/bin/env bash
# The GPU benchmark in one command, on the device machine (docs/gpu_bench.md):
#   bash bench/gpu/run.sh [gpu_bench.py options, e.g. --cases lora-bf16,ft-bf16]
# 1. prints the machine's Python, torch and CUDA; 2. installs the carried wheels (bench/gpu/install.py:
# torch is never reinstalled; xformers / bitsandbytes only where they fit this torch); 3. runs
# bench/gpu/gpu_bench.py (builds the random SD1.5 model, runs the matrix within --budget_s).
# Results: $OUT (or /tmp/sdtrain_gpu_bench/results): gpu_bench.json, gpu_bench.md, cases.log, setup.json,
# setup.log, bench.log.
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
RESULTS=${OUT:-/tmp/sdtrain_gpu_bench/results}
mkdir -p "$RESULTS"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DIFFUSERS_OFFLINE=1 PYTHONUNBUFFERED=1
echo "python, torch, CUDA, GPU visible:"
"$PY" -c 'import sys, torch; print(sys.version.split()[0], torch.__version__, torch.version.cuda, torch.cuda.is_available())' \
  2>&1 | tee "$RESULTS/setup.log"
if [ ! -f bench/gpu/wheels/manifest.json ]; then
  echo "no carried wheels (bench/gpu/wheels/manifest.json): run bash bench/gpu/prepare.sh first and carry bench/gpu/wheels" \
    | tee -a "$RESULTS/setup.log"
fi
if ! "$PY" bench/gpu/install.py --wheels bench/gpu/wheels --report "$RESULTS/setup.json" >>"$RESULTS/setup.log" 2>&1; then
  echo "setup failed; the end of $RESULTS/setup.log:"
  tail -n 25 "$RESULTS/setup.log"
  exit 1
fi
"$PY" -c 'import json, sys; r = json.load(open(sys.argv[1])); print("installed:", r["versions"]); [print(k, "not available:", v["reason"]) for k, v in r["optional"].items() if not v["ok"]]' \
  "$RESULTS/setup.json"
timeout "${BENCH_TIMEOUT_S:-430}" "$PY" bench/gpu/gpu_bench.py --out_dir "$RESULTS" --setup_json "$RESULTS/setup.json" "$@" \
  2>&1 | tee "$RESULTS/bench.log"
status=${PIPESTATUS[0]}
[ "$status" = 124 ] && echo "gpu_bench.py ran past ${BENCH_TIMEOUT_S:-430} s and was stopped; $RESULTS/gpu_bench.json holds the cases done"
exit "$status"
