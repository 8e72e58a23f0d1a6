#!/usr/bin/env bash
# One device call: GPU tests, then jserve offline (Qwen2.5-0.5B and Llama-3.1-8B shapes, random
# weights) and the serving sweep. Peers (HF transformers) run in a separate call:
#   python3 .anchors/hf_peer.py qwen2.5-0.5b,llama3.1-8b
# Usage on the device machine (repo root): bash benchmarks/run_gpu_e2e.sh [OUT_DIR]
set -uo pipefail
OUT=${1:-${OUT:-/tmp/out}}
mkdir -p "$OUT"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
date -u
[ "${GPU_TESTS:-1}" = 1 ] && timeout 240 python3 -m pytest -q -x tests/gpu 2>&1 | tail -5
[ "${QWEN:-1}" = 1 ] && timeout 280 python3 benchmarks/offline.py --model qwen2.5-0.5b --random-weights --num-requests 1000 \
  --input-len 200 --output-len 180 --max-num-seqs 256 --max-num-batched-tokens 2048 \
  --max-model-len 512 --json "$OUT/jserve_qwen.json" 2>&1 | grep -v "^WARNING" | tail -18
[ "${LLAMA:-1}" = 1 ] && timeout 330 python3 benchmarks/offline.py --model llama3.1-8b --random-weights --num-requests 500 \
  --input-len 200 --output-len 180 --max-num-seqs 256 --max-num-batched-tokens 2048 \
  --max-model-len 512 --json "$OUT/jserve_llama.json" 2>&1 | grep -v "^WARNING" | tail -18
if [ "${SERVE_BENCH:-1}" = 1 ]; then
  PYTHON=python3 OUT_DIR="$OUT" SERVE_ARGS="--max-model-len 512" timeout 240 bash benchmarks/serve_bench.sh 2>&1 | tail -30
fi
