# The device calls owed after session 9 (2026-12-01), in the order to run them. Each case fits
# one 10-minute call; every case writes its full output under $OUT and prints a short table.
# (Sessions 7-9 ran a, e, g, f and the 2-GPU correctness tests: RESULTS.md "Session 7" to "9".)
#
#   f (1 GPU, ~4 min): the bundled model's start-up OOM (8.17 MiB short in jit_fused_step's
#     first run at a 0.15 share, with 24 MiB activations + 84 MiB headroom reserved). Runs it
#     with the allocator's INFO log on (TF_CPP_MIN_LOG_LEVEL=0): at the OOM the BFC allocator
#     lists every live chunk, which names what holds the missing ~100 MiB. Then the GPU memory
#     test (asserts warm-up peak < usable).
#   m (1 GPU, ~8 min): a clean A/B of XLA's rematerialization pass (session 9's was confounded by
#     a warm autotune cache). Qwen2.5-0.5B, share 0.9, a fresh compilation cache for each run:
#     compile seconds and "MiB never touched" with the pass on and off. Prediction: the pass
#     runs on every step (its limit is negative with the pool filling the share); off, the
#     warm-up peak matches the 2-page probe's figure.
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
# Start-up on an H200 takes 90-210 s for Qwen2.5-0.5B at the default share (10 step variants,
# 6-14 s each, one at a time, plus the activation probe's 50-75 s): give each engine start
# >= 220 s of timeout. (Session 9's case f lost its whole call to 100-200 s timeouts.)
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
  TF_CPP_MIN_LOG_LEVEL=0 timeout 170 python3 benchmarks/memory_budget.py --model code-small --context 512 \
    --gpu-memory-utilization 0.15 > "$OUT/mem_code_small.txt" 2>&1; echo "rc=$?"
  grep "bfc_allocator\|InUse\|Sum Total\|RESOURCE" "$OUT/mem_code_small.txt" | awk '{print $NF, $0}' \
    | cut -c1-200 | tail -40
  timeout 330 python3 -m pytest -q -s -p no:cacheprovider -rf --tb=short tests/gpu/test_memory_gpu.py \
    > "$OUT/memory_tests.txt" 2>&1; grep "start-up\|peak bytes\|passed\|failed\|assert" "$OUT/memory_tests.txt"
  ;;
m)
  for remat in on off; do
    rm -rf ~/.cache/jserve/xla
    flags=""; [ "$remat" = off ] && flags=--xla_disable_hlo_passes=rematerialization
    XLA_FLAGS=$flags timeout 230 python3 benchmarks/memory_budget.py --model qwen2.5-0.5b --context 4096 \
      > "$OUT/remat_$remat.txt" 2>&1
    echo "### remat $remat"; grep "compiled .* variants\|activation peak\|after warm-up\|engine ready" \
      "$OUT/remat_$remat.txt" | cut -c1-220
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
