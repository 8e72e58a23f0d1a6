# The device calls owed after session 7 (2026-11-30), in the order to run them. Each case fits
# one 10-minute call; every case writes its full output under $OUT and prints a short table.
# (Session 7 ran a and e: RESULTS.md "Session 7".)
#
#   f (1 GPU, ~9 min): the GPU tests that failed or were cut off in session 7, each alone with
#     its full output (memory sizing: the code-small case failed with the output cut off; the
#     quantized engines with the near-tie rule over 5 candidates), then the split step's A/B on
#     the structured-output benchmark (Qwen2.5-0.5B shape): this tree against .before = the tree
#     before the split (git archive ab22e4e ...). Prediction: constrained/free ratio from about
#     0.6 to >= 0.85 on the H200 (the host's read + mask fill, ~1 ms for 64 rows, overlaps the
#     forward instead of adding to it).
#   g (1 GPU, ~4 min): does the per-call CUDA-graph update wait for the graph's previous launch?
#     step_floor --twins (the decode step as two executables in turn) on Qwen2.5-0.5B, and the
#     same step without command buffers. Session 7's numbers fit "fully serial": A 0.976 =
#     device ~0.52 + the call's 0.46 host; B 1.496 = that + ~0.5 of engine work. Prediction if
#     the update waits: A2 ~0.6 ms, B2 ~1.0 ms (>= 1000 tok/s); if not, A2 = A and B2 = B.
#   b (1 GPU, ~9 min): speculative decoding tables (benchmarks/spec_decode.py) and the memory
#     budget table (benchmarks/memory_budget.py).
#   c (nvidia-h200-x2): disaggregation correctness + benchmark (benchmarks/disagg.py, two runs).
#   d (nvidia-h200-x2): pipeline parallelism correctness + throughput (scale_out_runs.sh 7, 6),
#     quantized tp=2 through the Mosaic kernel per shard.
#
# Run from the repository root with .whl/ (and .before/ for a before/after) carried:
#   bash benchmarks/owed_gpu_runs.sh a
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
  timeout 120 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_disagg_gpu.py 2>&1 | tail -3
  timeout 230 python3 benchmarks/disagg.py --model llama3.1-8b --random-weights --modes disagg \
    --results "$OUT/disagg.jsonl" 2>&1 | table
  timeout 230 python3 benchmarks/disagg.py --model llama3.1-8b --random-weights --modes colo \
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
  timeout 150 python3 -m pytest -q -p no:cacheprovider -s tests/gpu/test_quant_engine_gpu.py -k tensor_parallel \
    2>&1 | tail -3
  timeout 420 bash benchmarks/scale_out_runs.sh 7 2>&1 | tail -5
  ;;
esac
