# The device calls owed after session 8 (2026-11-30), in the order to run them. Each case fits
# one 10-minute call; every case writes its full output under $OUT and prints a short table.
# (Sessions 7-8 ran a, e, g and the 2-GPU correctness tests: RESULTS.md "Session 7", "Session 8".)
#
#   f (1 GPU, ~9 min): issue 16's last number and the start-up memory bug. The memory test alone
#     with full output (session 8: code-small OOMs in warm-up, in the page mover's scatter;
#     start-up now logs "device memory after warm-up" with the peak), the quantized engines'
#     near-tie rule, then the structured-output benchmark (Qwen2.5-0.5B shape) on this tree and
#     on .before = the tree before the split step (git archive ab22e4e ...). Prediction:
#     constrained/free ratio from ~0.6 to >= 0.85 (the host's read + mask fill, ~1 ms for 64
#     rows, overlaps the forward).
#   h (1 GPU, ~9 min): issue 11's throughput targets on the v2 loop: Qwen2.5-0.5B 1000 x 200/180
#     (target 20k out tok/s; 13.6k on the old loop) and Llama-3.1-8B 500 x 200/180 (target 10k;
#     9.0k). Prediction: Qwen ~17-19k (the loop no longer waits for the host), Llama ~9.5k.
#   b (1 GPU, ~9 min): speculative decoding tables (benchmarks/spec_decode.py) and the memory
#     budget table (benchmarks/memory_budget.py). Expect batch-1 spec < 2x: a step with drafts
#     is read right after dispatch (no overlap while speculating).
#   d (nvidia-h200-x2, ~10 min): Llama-3.1-8B 500 x 200/180 at tp1 vs pp2 (scale_out_runs.sh 6).
#     Session 8 changed pp's micro-batching (decode steps run M = 1: S weight reads per step
#     instead of M + S - 1 = 3). Prediction: pp2 ~1.0x tp1 (the 1.7x target needs cross-step
#     overlap, not built); before the change it would have been ~0.8x.
#   s (nvidia-h200-x2, ~10 min): tp1 vs tp2 vs dp2 throughput (scale_out_runs.sh 2; targets
#     tp2 >= 1.7x, dp2 >= 1.9x).
#   c (nvidia-h200-x2, ~9 min): disaggregation benchmark (benchmarks/disagg.py, two runs).
#
# Run from the repository root with .whl/ (and .before/ for f) carried:
#   bash benchmarks/owed_gpu_runs.sh f
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/owed_runs}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .whl/*.whl || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:.
table() { grep "^|\|^##\|passed\|failed\|rror"; }

case "${1:-a}" in
a)
  timeout 300 python3 -m pytest -q -p no:cacheprovider -rf tests/gpu/test_quant_engine_gpu.py \
    tests/gpu/test_kv_quant_gpu.py tests/gpu/test_memory_gpu.py tests/gpu/test_spec_gpu.py \
    "tests/gpu/test_quant_matmul_gpu.py::test_mgpu_quant_matmul[4096-14336-w8a8-16]" \
    > "$OUT/gpu_tests.txt" 2>&1; tail -15 "$OUT/gpu_tests.txt"
  timeout 200 python3 benchmarks/step_floor.py qwen2.5-0.5b,llama3.1-8b --max-num-batched-tokens 16 \
    2>&1 | table | tee "$OUT/floor.txt"
  ;;
b)
  timeout 250 python3 benchmarks/spec_decode.py --methods ngram,draft_model --ks 2,4 --num-prompts 16 \
    --max-tokens 128 --json "$OUT/spec.json" 2>&1 | table | tee "$OUT/spec.txt"
  timeout 200 python3 benchmarks/spec_decode.py --methods ngram --ks 4 --workloads code --num-prompts 16 \
    --concurrency 1,8,32,64,128,256 --max-num-seqs 256 --json "$OUT/spec_sweep.json" 2>&1 | table
  timeout 120 python3 benchmarks/memory_budget.py --model llama3.1-8b --context 8192 2>&1 | table
  ;;
c)
  timeout 270 python3 benchmarks/disagg.py --model llama3.1-8b --random-weights --modes disagg \
    --results "$OUT/disagg.jsonl" 2>&1 | table
  timeout 270 python3 benchmarks/disagg.py --model llama3.1-8b --random-weights --modes colo \
    --results "$OUT/disagg.jsonl" 2>&1 | table
  ;;
f)
  timeout 200 python3 -m pytest -q -p no:cacheprovider -rf --tb=short tests/gpu/test_memory_gpu.py \
    > "$OUT/memory_tests.txt" 2>&1; tail -c 2500 "$OUT/memory_tests.txt"
  timeout 150 python3 -m pytest -q -p no:cacheprovider -rf --tb=line \
    "tests/gpu/test_kv_quant_gpu.py::test_engine_with_quantized_kv_on_gpu" \
    "tests/gpu/test_quant_engine_gpu.py::test_engine_greedy_on_gpu" 2>&1 | tail -4
  for tree in . .before; do
    echo "### $tree"
    (cd "$tree" && timeout 100 python3 benchmarks/structured_outputs.py --model qwen2.5-0.5b \
      --random-weights --rounds 3 2>&1 | table)
  done
  ;;
g)
  timeout 200 python3 benchmarks/step_floor.py qwen2.5-0.5b --max-num-batched-tokens 16 --twins \
    2>&1 | table | tee "$OUT/twins.txt"
  XLA_FLAGS=--xla_gpu_enable_command_buffer= timeout 150 python3 benchmarks/step_floor.py \
    qwen2.5-0.5b --max-num-batched-tokens 16 2>&1 | table | tee "$OUT/no_cmdbuf.txt"
  ;;
d)
  timeout 580 bash benchmarks/scale_out_runs.sh 6 2>&1 | tail -12
  ;;
h)
  timeout 280 python3 benchmarks/offline.py --model qwen2.5-0.5b --random-weights --num-requests 1000 \
    --input-len 200 --output-len 180 --max-num-seqs 256 --max-num-batched-tokens 2048 \
    --max-model-len 512 --json "$OUT/offline_qwen.json" > "$OUT/offline_qwen.txt" 2>&1
  grep -v "^W\|WARNING" "$OUT/offline_qwen.txt" | tail -8
  timeout 300 python3 benchmarks/offline.py --model llama3.1-8b --random-weights --num-requests 500 \
    --input-len 200 --output-len 180 --max-num-seqs 256 --max-num-batched-tokens 2048 \
    --max-model-len 512 --json "$OUT/offline_llama.json" > "$OUT/offline_llama.txt" 2>&1
  grep -v "^W\|WARNING" "$OUT/offline_llama.txt" | tail -8
  ;;
s)
  timeout 580 bash benchmarks/scale_out_runs.sh 2 2>&1 | tail -12
  ;;
esac
