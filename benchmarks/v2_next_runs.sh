#!/usr/bin/env bash
# Engine core v2 (issue 11): the device calls still owed, in the order to run them.
#
#   call 1 (~6 min): why did the v2 decode step's call wait for the device in runs 2-3 (RESULTS.md,
#          v2 section)? A/B on Qwen2.5-0.5B, cold compile cache each time: start-up compiling 1 vs 8
#          variants at once (the GPU autotuner times kernels on the device), command buffers on vs
#          off, and a profiler trace of the default. Settle this before any kernel work.
#   call 2 (~9 min): the targets, with the HF peer in the same call: batch-1 decode of both shapes
#          (and A/B recompiles of the Qwen decode step: Pallas K/V write, no split-K, cuBLAS GEMMs);
#          call 2b: offline throughput (Qwen 1000 x 200/180, Llama 500 x 200/180), cold start-up.
#   call 3 (~5 min): serving at concurrency 1/2/4 (benchmarks/serve_bench.sh) and warm start-up.
#   call 4 (~4 min): serving only, with the wheels in .whl/ carried (uvicorn is not in the image).
#
# Run on the GPU machine from the repository root with .anchors/ carried
# (cp -r ../shared/anchors .anchors): bash benchmarks/v2_next_runs.sh 1   (or 2, 3)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH=.
OUT=${OUT:-/tmp/v2_runs}
mkdir -p "$OUT"
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/jserve/xla
nvidia-smi --query-gpu=name,driver_version --format=csv
quiet() { grep -v -i "warn\|cuda_timer"; }

case "${1:-1}" in
1)
  for threads in 1 8; do
    rm -rf "$CACHE"
    echo "=== compile threads $threads ==="
    timeout 150 python3 benchmarks/step_floor.py qwen2.5-0.5b --compile-threads "$threads" \
      --dump "$OUT" --trace "$OUT/trace_t$threads" 2>&1 | quiet | tee -a "$OUT/ab.txt"
  done
  rm -rf "$CACHE"
  echo "=== command buffers off (compile threads 1) ==="
  XLA_FLAGS=--xla_gpu_enable_command_buffer= timeout 150 python3 benchmarks/step_floor.py \
    qwen2.5-0.5b --compile-threads 1 2>&1 | quiet | tee -a "$OUT/ab.txt"
  ;;
2)
  timeout 330 python3 benchmarks/step_floor.py qwen2.5-0.5b --dump "$OUT" --ab kv-write-kernel,\
xla:xla_gpu_enable_split_k_autotuning=false,xla:xla_gpu_enable_triton_gemm=false 2>&1 | quiet | tee "$OUT/floor.txt"
  timeout 150 python3 benchmarks/step_floor.py llama3.1-8b 2>&1 | quiet | tee -a "$OUT/floor.txt"
  timeout 120 python3 -c "
import sys; sys.path.insert(0, '.anchors'); import hf_peer, torch, json
for name in ('qwen2.5-0.5b', 'llama3.1-8b'):
    m, cfg = hf_peer.build(name, 'cuda', torch.bfloat16, 'sdpa')
    print(json.dumps(dict(model=name, hf_static_bs1_tok_s=round(hf_peer.bs1(m, cfg, 'cuda', 128, 256, 'static'), 1))), flush=True)
    del m; torch.cuda.empty_cache()
" 2>&1 | quiet | tee "$OUT/hf.txt"
  ;;
2b)
  rm -rf "$CACHE"
  timeout 150 python3 benchmarks/offline.py --model qwen2.5-0.5b --random-weights --num-requests 1000 \
    --input-len 200 --output-len 180 2>&1 | quiet | tail -25 | tee "$OUT/offline_qwen.txt"
  timeout 200 python3 benchmarks/offline.py --model llama3.1-8b --random-weights --num-requests 500 \
    --input-len 200 --output-len 180 2>&1 | quiet | tail -25 | tee "$OUT/offline_llama.txt"
  ;;
3)
  OUT_DIR="$OUT" timeout 300 bash benchmarks/serve_bench.sh 2>&1 | quiet | tail -30 | tee "$OUT/serve.txt"
  timeout 200 python3 benchmarks/offline.py --model llama3.1-8b --random-weights --num-requests 8 \
    --input-len 16 --output-len 8 2>&1 | quiet | grep startup_s | tee "$OUT/warm_startup.txt"
  ;;
4)
  # Serving needs uvicorn/starlette (and llguidance, grpcio 1.85.1) from .whl/ (carried): see the
  # device README's notes on wheels; this installs them into /tmp/site for this call.
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:.
  OUT_DIR="$OUT" BACKENDS=openai PYTHON=python3 SERVE_ARGS="--max-num-batched-tokens 512 --max-num-seqs 16" \
    timeout 330 bash benchmarks/serve_bench.sh 2>&1 | quiet | tail -20 | tee "$OUT/serve.txt"
  ;;
esac
