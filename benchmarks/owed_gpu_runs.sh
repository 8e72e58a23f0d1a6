# The device calls owed after session 24 (2026-12-03), in the order to run them. Each case fits
# one 10-minute call; every case writes its full output under $OUT and prints a short table.
# (Sessions 7-23 ran a, e, g, t, l, v, the Qwen half of h, u (partly), ca, sd, e, n, st, sw, sw2,
# sw3 (its threshold half), dk, hq, bu, bu1, bu2, bt, bh, sv, i11 (= hl + u8's warm half), b8
# (= x + the 8B's HF peer), u8c, u8w, u8t, u8f, d27, sk (as mus + vt), t, i11f, mu, vt2 (which
# holds b's k table), qs, qd, qe, qm (q's step half), qo, the 2-GPU correctness tests and the
# OOM diagnosis, qp, qt (as q21), q21b, w21, qf, qx2, qx3 (with qr's M = 1 column) and dd's
# distillation, dd, qb, kvf, vt3, sa, fp8s, kvt; session 24 dd2, qk, kvw, qmn, qk2, vt4,
# kva: RESULTS*.md.) Order: vmm (issue 12: batch 1 under XLA's VMM client), kvt2 (issue 13: the fp8 KV step at 8k with f16 dots, and where
# the rest of its extra time goes), sa2 (issue 16: the arms interleaved in one process), qx4
# (issue 13: w8a8 with Triton GEMMs), b2, o, u, w, f, m, u1; then, on 2 GPUs, pb, d, s, c.
# Session 16 turned XLA's rematerialization pass off for step programs: start-ups should fit
# their timeouts at share 0.9 too, but spec cases keep 0.5 until a run shows it.
#
#   sw4 (1 GPU, ~6 min; session 16's try timed out compiling under the rematerialization pass):
#     the sweep at the new default (disable_by_batch_size 4) after session 15's
#     pausing draft model (steps without speculation: the ordinary target step + the draft's
#     catch-up forward, no verify). Prediction: draft model at 16 / 256 running 0.92 / 0.76x ->
#     ~0.95 / ~0.92x; n-gram unchanged (~1.0x above 4); batch 1 as in sw3.
#   sv (1 GPU, ~9 min): issue 11's serving row (Qwen2.5-0.5B shape, 16 requests 128 / 64, c = 1 / 2
#     / 4, HTTP streamed) one step at a time, then with bursts of 8 (session 16: batch-1 decode
#     642 -> 1023 tok/s). Sessions 5-8: 578 / 1321 / 2207 out tok/s, p95 E2E 141 / 109 / 128 ms
#     (targets 1314 / 2349 / 4578, < 80 ms). Prediction with bursts: TPOT ~1.0 ms at c = 1, p95
#     ~85 ms; c = 4 gains less (arrivals end bursts).
#   sw3 (1 GPU, ~9 min): the speculation sweep after session 14's n-gram change, median of 3 runs
#     per point, always on and off above 8 running. Prediction: n-gram with the threshold at 16
#     and 256 running ~0.97-1.0x (ordinary variants now), always on at 256 ~1.0x (the budget
#     leaves most rows without drafts); the draft model keeps ~0.6-0.75x at 16-256 either way
#     (its speculative variant runs every step); batch 1 n-gram ~1.5x, draft model ~1.25x.
#   dk (1 GPU, ~9 min): Qwen's decode step under A/B patches (kv-write-kernel, attn-nosplit,
#     attn-fused-combine) and the 32/64-token buckets' compile at autotune level 0. Prediction
#     (session 5's trace: two K/V scatters 4.4 us and the split merge 2.6 us per layer): the
#     kernel K/V write -2 to -4% A, no split -3% to +5% at 300 keys, fused combine -1 to -3%;
#     level 0 compiles 32/64 in ~5 s (default ~20 s) at <= 5% slower steps.
#   b (1 GPU, ~9 min): speculative decoding tables (benchmarks/spec_decode.py, draft model, k = 2,
#     4, 6, chained rows and the synchronous loop beside them) and the concurrency sweep that
#     sets disable_by_batch_size. Session 13 (call 5): k = 4 1.22x at batch 1 (synchronous loop
#     0.91x), acceptance 0.32. Prediction (chained): k = 2 ~1.2x (a cheaper step, 1.94 tokens per
#     step), k = 6 ~1.1x (2.38 tokens, two more draft decodes per step); at 256 concurrent requests
#     below 0.95x without disable_by_batch_size (every step verifies K + 1 positions per row).
#     b2 (~9 min): the n-gram tables (chained on the device since session 14: 1.74x at k = 4 on
#     code in call 2; prediction k = 2 ~1.5x, k = 6 ~1.8x) and the memory budget table.
#   u (1 GPU, ~9 min): start-up phase by phase (benchmarks/startup.py), Qwen2.5-0.5B at max_num_seqs
#     256 / budget 2048: cold (empty cache), then warm. Session 13: with cuBLAS GEMMs for buckets
#     >= 128 the probe took 23 s (was 75) and the 16 variants were compiled at 122 s; the run was
#     stopped at 160 s before the split pairs and warm-up. Prediction: cold ~150 s, warm <= 30 s.
#   u8 (1 GPU, ~10 min): the same for Llama-3.1-8B (issue 11's target: <= 60 s cold, <= 15 s warm).
#     Prediction after the rematerialization pass went (Qwen 150 -> 99 s): cold ~90 s, warm ~20 s.
#   q (1 GPU, ~8 min): issue 13's quantized decode at the step level: step_floor.py on the 8B in
#     bf16 and int8 (session 6: int8 A 6.14 ms vs bf16 4.56), and the two other 8B shapes of
#     quant_matmul.py (session 13: split-K cut the o projection's M = 1 int8 call 34.8 -> 23.4 us).
#     Prediction: int8 A 6.1 -> ~5.0 ms (still launch-heavy: 629 kernels).
#   u1 (1 GPU, ~6 min): the same cold start with one compile thread (the old order), the A/B.
#   hl (1 GPU, ~10 min): the Llama-3.1-8B half of h (500 x 200/180, target 10k out tok/s; 9.0k
#     on the old loop); in session 12 its start-up outlasted its 300 s.
#   w (1 GPU, ~4 min): why a numpy step input costs ~1 ms per call with the BFC allocator (session
#     12, call 1: 2.04 vs 1.08 ms) and whether the compile-option SKIP_TEMP that removed it is
#     safe without the VMM allocator: cmdbuf_probe.py with XLA's command-buffer log on (which
#     allocations move per call, column by column) and the chained-token check. Prediction: the
#     numpy input moves the step's scratch (temp) allocation every call, so XLA re-records the
#     whole graph; SKIP_TEMP then skips updating nodes whose scratch moved, which is unsafe. Also
#     xla_gpu_require_exclusive_lock ("reduces the cost of ... command buffer update").
#   x (1 GPU, ~6 min): the Llama-3.1-8B half of the decode-step GEMM A/B (session 13 ran Qwen's:
#     cuBLAS +13% on the 16-token decode step, autotune level 0 equal there but 6.5-21x slower on
#     large buckets). Prediction: cuBLAS ~0 on the 8B's decode (its GEMMs are weight-read bound).
#   f (1 GPU, ~5 min): the GPU memory test on the pool-hold fix (session 10: the bundled model now
#     starts at a 0.15 share, 5.8 MiB never touched; Qwen2.5-0.5B at 0.15 not yet re-run).
#     Prediction: both pass (warm-up peak < usable).
#   t (1 GPU, ~6 min): issue 16's ratio (session 11 on the plain sampler: 0.70 / 0.58,
#     constrained ~7 ms per step, free 4-5); re-run after case l's fix.
#   m (1 GPU, ~8 min): a clean A/B of XLA's rematerialization pass (session 9's was confounded by
#     a warm autotune cache). Qwen2.5-0.5B, share 0.9, a fresh compilation cache for each run:
#     compile seconds and "MiB never touched" with the pass on and off. Prediction: the pass
#     runs on every step (its limit is negative with the pool filling the share); off, the
#     warm-up peak matches the 2-page probe's figure.
#   kv (1 GPU, ~9 min): issue 13's KV target, never measured: Qwen2.5-0.5B, 16 sequences decoding
#     at 8k tokens, bf16 against fp8 pool (benchmarks/kv_dtype_step.py; target: 2x the pages at
#     <= 3% extra step time). Prediction: 1.97x the pages (the scales take the rest), +2-5%.
#   o (1 GPU, ~8 min): issue 14's orbax target on one GPU: Llama-3.1-8B restore vs safetensors
#     load at tp 1 (benchmarks/orbax_load.py; the tp 2 half stays in scale_out_runs.sh).
#   k (1 GPU, ~10 min): issue 12's real-scale target, never measured: one Llama-3.1-8B verify
#     step with k = 4 against a 1-token decode step, batch 1 and 64 (spec_verify_step.py; target
#     <= 1.15x at batch 1). Most of the call is the 8B's start-up.
#   pb (nvidia-h200-x2, ~10 min): session 16's pipelined bursts (issue 14's cross-step overlap:
#     the rows in S groups circling through the stages). Llama-3.1-8B shape, greedy decode at
#     1 / 64 / 256 rows, one GPU then pp 2, each one step at a time and in bursts of 8 (one GPU
#     bursts only up to 16 rows). Prediction: pp2 bursts at 256 rows ~1.1-1.2x pp2 one step and
#     ~1.1x one GPU (decode stays weight-bound at 128 rows a group; 1.7x needs compute-bound
#     groups: 512+ running); at 1 row ~1.0x (one group holds the row, the other idles).
#   d (nvidia-h200-x2, ~10 min): Llama-3.1-8B 500 x 200/180 at tp1 vs pp2 (scale_out_runs.sh 6).
#     Session 8 changed pp's micro-batching (decode steps run M = 1: S weight reads per step
#     instead of M + S - 1 = 3). Prediction: pp2 ~1.0x tp1 (the 1.7x target needs cross-step
#     overlap, not built); before the change it would have been ~0.8x. Session 16 unrolled the
#     M = 1 tick loop (a loop's body copied weight slices on the H200 in the burst): prediction
#     for the decode steps' share of it, from a copy of the stage's weights per tick, ~1.3x faster.
#   s (nvidia-h200-x2, ~10 min): tp1 vs tp2 vs dp2 throughput (scale_out_runs.sh 2; targets
#     tp2 >= 1.7x, dp2 >= 1.9x).
#   c (nvidia-h200-x2, ~9 min): disaggregation benchmark (benchmarks/disagg.py, two runs).
#
# Start-up on an H200 took 90-210 s for Qwen2.5-0.5B at the default share in sessions 9-10, and
# over 290 s cold at max_num_seqs 256 / budget 2048 in session 12 (over 160 s in session 13 with
# cuBLAS GEMMs for large buckets): give each engine start >= 200 s of timeout on a cold machine.
# Run from the repository root with .whl/ carried:
#   bash benchmarks/owed_gpu_runs.sh f
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/owed_runs}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .whl/*.whl || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:.
table() { grep "^|\|^##\|passed\|failed\|rror\|  burst\|  decode step\|    burst\|    decode step"; }
offline_8b() {   # Llama-3.1-8B offline (cases qm, qp, qo, w21): $1 none or a quantization, $2 the
  local qz=$1 name=$2 qa=""   # output's name under $OUT; the rest: offline.py's flags; T8: timeout s
  shift 2
  [ "$qz" != none ] && qa="--quantization $qz"
  timeout "${T8:-150}" python3 benchmarks/offline.py --model llama3.1-8b --random-weights --max-num-seqs 256 \
    --max-num-batched-tokens 2048 --max-model-len 512 $qa "$@" > "$OUT/$name.txt" 2>&1
}
sweep4() {   # the speculation sweep at the engine's default disable_by_batch_size (cases sk, sw4)
  timeout 290 python3 benchmarks/spec_decode.py --methods ngram,draft_model --ks 4 --workloads code \
    --num-prompts 8 --max-tokens 96 --concurrency 1,4,16,256 --max-num-seqs 256 --max-model-len 1024 \
    --max-num-batched-tokens 512 --gpu-memory-utilization 0.5 --repeat 3 --disable-by-batch-size default \
    --json "$OUT/spec_sweep_4.json" > "$OUT/spec_sweep_4.txt" 2>&1
  grep -v "^W\|WARNING\|^I" "$OUT/spec_sweep_4.txt" | tail -16
}

case "${1:-a}" in
kvq)
  # kvt2's first half: the quantized-KV GPU tests (held-out perplexity and the engine) on the f16
  # dots that session 24 made the quantized pools' default. Prediction: they pass.
  timeout 150 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_kv_quant_gpu.py 2>&1 | tail -3
  ;;
vt5)
  # Issue 12 after session 25's merged draft forward (case vmm: the spec step 1.135 -> 1.046 ms;
  # 2.47x against its own process's base, 2.05-2.12x against the faster base of that call, whose
  # bases ran 0.81-1.22 ms per step). vt4's run on this tree: batch 1 and 256 running, the base
  # built before and after (each ratio against the faster). Prediction: batch 1 ~2.0-2.2x, 256
  # running ~1.0x (speculation off there: the change does not act).
  timeout 290 python3 benchmarks/spec_decode.py --methods draft_model --ks 4 --workloads code \
    --num-prompts 8 --max-tokens 96 --concurrency 1,256 --max-num-seqs 256 --max-model-len 1024 \
    --max-num-batched-tokens 512 --gpu-memory-utilization 0.5 --repeat 3 --disable-by-batch-size default \
    --trace --base-twice --json "$OUT/spec_vt5.json" > "$OUT/spec_vt5.txt" 2>&1
  grep -v "^W\|WARNING\|^I" "$OUT/spec_vt5.txt" | grep -v "|---" \
    | grep "^base\|^draft\|^code\|^| \(step\|schedule\|dispatch\|launch\|launch_on_idle\|wait\|prepare\) \|^###\|rror"
  ;;
vmm)
  # Issue 12's batch 1 (session 24, vt4: 1.45-1.80x; target 2x). vt4's traces: the speculating
  # step's launch took 0.198 ms when the device was idle but 0.548 ms when it was busy (653 of
  # 1,017 launches), the base's 0.406 ms (idle). Suspect: the per-call CUDA-graph update (moved
  # buffers) cannot overlap the graph's previous run, so the launch waits for the device and the
  # update lands on the critical path. XLA's VMM client (XLA_FLAGS update mode SKIP_TEMP, sessions
  # 12 / 14: the numpy input's ~1 ms update gone on Qwen) in a second process beside the default
  # one; spec_verify_step times both steps alone (read each step, and back to back). Also new in
  # session 25: the draft's forward over the step's tokens carries the emitted token, so a
  # speculative step runs K - 1 draft decodes instead of K (draft.draft_step). Predictions:
  # old as vt4 (~1.8x at concurrency 1); the verify step back to back ~0.8-1.0 ms (device-bound:
  # ~300 small kernels); new: the spec step -8-10% (one of ~11 small forwards gone), ~1.95x;
  # VMM: the busy launches fall to ~0.25 ms, the spec step to ~0.85 ms, the base ~0.75 ms.
  # Arms: "new" this tree, "old" the tree before the draft's merged first forward (.before/, carried:
  # git archive of 76c6849), "vmm" this tree under the VMM client.
  spec_b1() {   # $1 arm name; run from the tree to time
    timeout 170 python3 benchmarks/spec_decode.py --methods draft_model --ks 4 \
      --workloads code --num-prompts 8 --max-tokens 96 --concurrency 1 --max-num-seqs 8 \
      --max-model-len 1024 --max-num-batched-tokens 256 --gpu-memory-utilization 0.5 --repeat 2 \
      --trace --json "$OUT/spec_$1.json" > "$OUT/spec_$1.txt" 2>&1
    echo "## arm $1 (rc $?)"
    grep -v "^W\|WARNING\|^I" "$OUT/spec_$1.txt" | grep -v "|---" \
      | grep "^base\|^draft\|^code\|^| \(step\|dispatch\|launch\|launch_on_idle\|wait\|prepare\) \|^###\|rror"
  }
  spec_b1 new
  [ -d .before ] && (cd .before && PYTHONPATH=/tmp/site:. spec_b1 old)
  XLA_FLAGS=--xla_gpu_command_buffer_update_mode=SKIP_TEMP spec_b1 vmm
  timeout 110 python3 benchmarks/spec_verify_step.py --model code-small --no-random-weights \
    --draft-model code-draft --k 4 --batches 1 --contexts 256 --iters 50 2>&1 | grep -v "^W\|WARNING\|^I"
  XLA_FLAGS=--xla_gpu_command_buffer_update_mode=SKIP_TEMP XLA_CLIENT_MEM_FRACTION=0.5 timeout 40 python3 -c \
    "import jax; s = jax.devices()[0].memory_stats(); print('VMM memory_stats:', {k: s[k] for k in sorted(s) if 'limit' in k or 'in_use' in k})"
  ;;
fp8s)
  # Issue 13's fp8 KV (session 23, call 2: the GPU test of scatter_rows' byte view failed and the
  # 8B with an fp8 pool ran out of memory in a page move's jit__scatter, a pool array's 1.48 GiB).
  # Which writes, copies and reads of an fp8 pool run in place, by compiled scratch. Prediction
  # (CPU: only uint8-stored pools are in place): the same on the GPU; then fp8 pools are stored
  # as uint8 and bitcast where read.
  python3 benchmarks/fp8_pool_scratch.py --pages 4096 2>&1 | grep "^|\|^##\|rror" | tee "$OUT/fp8_scratch.txt"
  ;;
dd2)
  # Issue 12's batch-1 target (session 23, call 1: 2.28x at k = 4 with the distilled draft, but
  # that call's engine without speculation ran 870.7 tok/s against 1,102-1,120 in sessions 19
  # and 22; against those the speculating engine's 1,986 is ~1.8x). The same table with the
  # base built before and after the speculating engines, each ratio against the faster.
  # Prediction: bases ~1,000-1,100 tok/s, k = 4 ~1.9-2.0x.
  timeout 330 python3 benchmarks/spec_decode.py --methods draft_model --ks 2,4 --workloads code \
    --num-prompts 8 --max-tokens 96 --max-num-batched-tokens 256 --max-model-len 1024 \
    --gpu-memory-utilization 0.5 --base-twice --json "$OUT/spec_dd2.json" > "$OUT/spec_dd2.txt" 2>&1
  grep -v "^W\|WARNING\|^I" "$OUT/spec_dd2.txt" | tail -8
  ;;
sa2)
  # Issue 16 (session 23, case sa: inconclusive, the machine slowed between the arms' processes:
  # the free run's launch 0.76 -> 1.59 ms). The same arms interleaved within every round of one
  # process (--arms). Prediction: if llguidance's threads crowd XLA's, threads=4 cuts the split
  # forward's launch beside the grammar (2.2 ms) toward the free step's (~0.8) and the ratio to
  # ~0.65-0.7; if the GIL, switch=0.0002 does; if neither moves it, the launch's own cost is
  # the lead: arm serial runs the grammar before the forward's launch (beside_grammar = advance
  # + masks + the launch alone on an idle device; session 10 had it at ~2 ms); arm fused runs
  # without the split step (read, masks, one launch; predicted ~0.70 in session 21).
  timeout 300 python3 benchmarks/structured_outputs.py --model qwen2.5-0.5b --random-weights --rounds 2 \
    --trace --arms default,threads=4,switch=0.0002,serial,fused > "$OUT/so_arms.txt" 2>&1
  grep "^|\|^##" "$OUT/so_arms.txt" | grep -v "|---" | grep "^| [0-9]\|launch\|beside\|masks\|advance\|^| step\|^##"
  ;;
qmn)
  # Issue 13's int8 decode (session 24, case qk: the int8 step's 128 extra kernels are one
  # input_transpose_fusion per quantized matmul, the epilogue turning out^T [split_k, N, Mp]
  # back into [M, N]). DecodeConfig.store_mn stores each tile as [Mp, block_n] (WGMMA_TRANSPOSED
  # registers into a transposed SMEM view), so no transpose follows. Its GPU tests, then the 8B's
  # int8 decode step with and without it. Prediction: the tests pass; 527 kernels -> 399-495
  # (the sums over split_k > 1 may stay kernels of their own), 3.62 -> ~3.3-3.5 ms.
  timeout 150 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_quant_matmul_gpu.py \
    -k "persistent_decode_configs" 2>&1 | tail -3
  timeout 240 python3 benchmarks/step_floor.py llama3.1-8b --max-num-batched-tokens 16 \
    --quantization int8 --ab quant-store-mn 2>&1 | table | grep "^##\|^| A \|failed"
  ;;
qk2)
  # Issue 13's int8 decode target (1.6x bf16) after session 24's store_mn became the default
  # (case qmn: 3.819 -> 3.376 ms, 527 -> 462 kernels; bf16 not in that call). The 8B's int8
  # and bf16 decode steps in one call. Prediction: int8 ~3.4 ms, bf16 ~4.7-5.0: ~1.4-1.45x.
  # (Session 24 ran it with the A/B quant-sum-adds, since refuted and removed.)
  timeout 200 python3 benchmarks/step_floor.py llama3.1-8b --max-num-batched-tokens 16 \
    --quantization int8,none 2>&1 | table | grep "^##\|^| A "
  ;;
qk)
  # Issue 13's int8 decode (session 23, case qb: the 8B int8 step at 76% of its HBM floor, 527
  # kernels against bf16's 399). Dump both decode steps (16-token bucket) and count the kernels
  # by kind (benchmarks/hlo_kernels.py), ~3 min. Prediction: +128 = one epilogue fusion per
  # quantized matmul (split-K sum, transpose, scale: mgpu_decode.finish), 4 per layer.
  timeout 200 python3 benchmarks/step_floor.py llama3.1-8b --max-num-batched-tokens 16 \
    --quantization int8,none --dump "$OUT" 2>&1 | table | grep "^##\|^| A "
  python3 benchmarks/hlo_kernels.py "$OUT/llama3.1-8b.int8.decode_step.hlo.txt" \
    "$OUT/llama3.1-8b.decode_step.hlo.txt" | tee "$OUT/hlo_kernels.txt" | head -30
  ;;
kvw)
  # Issue 13's fp8 KV after session 24's fused quantizing write (pallas_kernels/kv_write/
  # gpu_quant.py: one launch per layer for the started pages' scales, K and V, where XLA ran 16
  # kernels). Its GPU tests (Triton lowering, against the reference; in place), then case kvt's
  # step time at 8k. Prediction: the tests pass; fp8 step +28.8% -> ~+10-15% (24 layers x 15
  # fewer kernels ~0.3-0.4 ms of session 23's +0.53 ms; the rest is the dequantizing attention).
  timeout 120 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_kv_quant_gpu.py -k "fused or scratch" \
    2>&1 | tail -3
  timeout 300 python3 benchmarks/kv_dtype_step.py --kv-dtypes auto,fp8 2>&1 | grep "^|\|^##\|  auto\|  fp8" \
    | tee "$OUT/kv_dtype.txt"
  ;;
kvt2)
  # Issue 13's fp8 KV at 8k (session 24, call 2: fp8 step 1.354x bf16's; call 4: the attention
  # kernel alone 1.081x with bf16 dots and 0.979x with f16 dots, now the default for quantized
  # pools: so ~0.5 ms of the step's +0.63 ms is outside the attention kernel). The step again,
  # with both decode steps' optimized programs dumped and their kernels counted by kind.
  # Prediction: fp8 ~1.25-1.3x (the kernel's -0.1 ms); the census shows where the rest is
  # (candidates: the write kernel, the scales' traffic, copies of 2.8 GB pool arrays). First the
  # quantized-KV GPU tests (held-out perplexity and the engine, now on f16 dots).
  timeout 150 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_kv_quant_gpu.py 2>&1 | tail -2
  timeout 330 python3 benchmarks/kv_dtype_step.py --kv-dtypes auto,fp8 --dump "$OUT" 2>&1 \
    | grep "^|\|^##\|  auto\|  fp8" | tee "$OUT/kv_dtype.txt"
  python3 benchmarks/hlo_kernels.py "$OUT/fp8.decode_step.hlo.txt" "$OUT/auto.decode_step.hlo.txt" \
    | tee "$OUT/hlo_kernels.txt" | head -30
  ;;
kva)
  # Issue 13's fp8 KV step time (session 23, case kvt: +28.8% per decode step at 16 x 8k with an
  # fp8 pool, Qwen2.5-0.5B shape, target <= 3%). The attention kernel alone per layer call, bf16
  # pool against fp8 (uint8) with GpuConfig.kv_compute "float16" (K/V convert to f16 only) and
  # 2x keys per inner step, and (session 24) "float8": the QK dot in e4m3 against K as stored.
  # First the GPU tests of kv_compute. Prediction: fp8 default ~1.3-1.5x bf16's kernel time
  # (session 24's kvw: +35% per step at 8k, the write ruled out); float16 -15-25% of that; 2x
  # keys -10-20%; float8 below float16 (no K conversion at all); the best ~1.0-1.1x. If so:
  # default_config takes it for 1-byte pools, then kvt again.
  timeout 120 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_kernels_gpu.py -k kv_compute 2>&1 | tail -2
  timeout 300 python3 benchmarks/kv_dtype_attention.py 2>&1 | grep "^|\|^##\|rror" | tee "$OUT/kv_attn.txt"
  ;;
kvt)
  # Issue 13's fp8 KV after session 23 stored fp8 pools as uint8 (the 8B's fp8-pool start-up
  # now fits): the GPU scratch test (its session-23 limit was below its own rows' temporaries),
  # then case kv's step time at 8k context, 300 s. Prediction: the test passes; 2.0x the pages,
  # fp8 step time within +-3% of bf16's (the attention reads half the bytes, dequantizes them).
  timeout 90 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_kv_quant_gpu.py -k scratch 2>&1 | tail -2
  timeout 300 python3 benchmarks/kv_dtype_step.py --kv-dtypes auto,fp8 2>&1 | grep "^|\|^##\|  auto\|  fp8" \
    | tee "$OUT/kv_dtype.txt"
  ;;
qd)
  # Issue 13 (session 20): the persistent decode kernel (mgpu_decode.py: balanced units on
  # resident CTAs, one TMA pipeline per CTA, the dequantized tile in registers) against the tiled
  # grid (session 19's case qs: gate/up M = 1 64.7 us default, 57.6 best; down 42.3 / 39.7), and
  # the 8B's decode step in int8 against bf16 (session 13: 4.180 vs 4.667 ms, 1.12x; target 1.6x).
  # Prediction: gate/up M = 1 ~38 us, down ~24 us, registers ~10% under SMEM A; the 8B's int8
  # step ~3.3 ms (~1.4x bf16).
  timeout 100 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_quant_matmul_gpu.py \
    -k "persistent or configs or int8" 2>&1 | tail -3 | tee "$OUT/quant_tests.txt"
  timeout 180 python3 benchmarks/quant_matmul.py --shape 28672x4096 --ms 1,16 --sweep --reps 3 2>&1 \
    | grep "^|\|^x\[\|sweep_best\|\"kernel\"\|error" | tee "$OUT/quant_28672x4096.txt"
  timeout 80 python3 benchmarks/quant_matmul.py --shape 4096x14336 --ms 1,16 --reps 3 2>&1 \
    | grep "^|\|^x\[\|error" | tee "$OUT/quant_4096x14336.txt"
  timeout 200 python3 benchmarks/step_floor.py llama3.1-8b --max-num-batched-tokens 16 \
    --quantization int8,none 2>&1 | table | tee "$OUT/floor_quant.txt"
  ;;
qe)
  # Issue 13 (session 20, after case qd: the persistent kernel 54.9 us at gate/up M = 1 and 41.8
  # at down, ~1 us per 8 KB pipeline step per CTA whatever the CTA count or ring depth, noisy
  # +-20% between configs): long K tiles (block_k up to 1024: a weight row's 128 B runs were
  # 4,096 / 14,336 B apart) with more timed calls (its w8a8 offline half became case qm).
  # Prediction: block_k 512 gives ~45 us at gate/up and ~30 at down (longer contiguous runs).
  for shape in 28672x4096 4096x14336; do
    timeout 130 python3 benchmarks/quant_matmul.py --shape $shape --ms 1,16 --sweep --iters 40 --reps 5 2>&1 \
      | grep "^|\|^x\[\|sweep_best\|error" | tee "$OUT/quant_$shape.txt"
  done
  ;;
qm)
  # Issue 13 (session 20): case qe's w8a8 engine ran out of memory in its warm-up at share 0.9
  # (1.80 GiB for jit_fused_step, no warning that the compiled steps' peak passed the probe's).
  # Here both engines at share 0.8 with jserve's INFO lines (probe, steps' peak, memory after
  # warm-up), then the 8B's int8 decode step with the new decode default (block_k 512, 2
  # stages). Prediction: w8a8 starts at 0.8, ~1.0-1.1x bf16's throughput; int8 step ~3.8 ms.
  for qz in none fp8_w8a8; do
    offline_8b $qz offline_8b_$qz --num-requests 500 --input-len 200 --output-len 180 \
      --gpu-memory-utilization 0.8 --log-level INFO --json "$OUT/offline_8b_$qz.json"
    echo "### quantization $qz"
    grep "^| \(startup\|batch1\|throughput_out\|pool\)\|activation\|after warm-up\|KV pool\|RESOURCE" \
      "$OUT/offline_8b_$qz.txt" | cut -c1-260
  done
  timeout 150 python3 benchmarks/step_floor.py llama3.1-8b --max-num-batched-tokens 16 \
    --quantization int8,none 2>&1 | table | grep "^##\|^| A \|^| B " | tee "$OUT/floor_quant.txt"
  ;;
qf)
  # Issue 13's decode target (>= 1.6x bf16 with fp8 or int8 weights) in one call for both 8-bit
  # formats: session 21's call 2 ran the fp8 weight-only kernel 8-14% under int8's (gate/up 43.7
  # vs 47.2 us, down 28.5 vs 33.2, M = 1), and session 20's same-call ratio is int8's alone
  # (3.804 vs 4.656 ms = 1.22x). Prediction: fp8 ~3.5 ms (~1.33x), int8 ~3.7 ms (~1.26x).
  timeout 280 python3 benchmarks/step_floor.py llama3.1-8b --max-num-batched-tokens 16 \
    --quantization fp8,int8,none 2>&1 | table | grep "^##\|^| A \|^| B " | tee "$OUT/floor_fp8_int8.txt"
  ;;
qr)
  # Issue 13 (session 21, KERNEL_NOTES run 14: pre-tiled weights changed nothing, so the run
  # length of each weight row does not bound the decode kernel): each CTA's x slices resident
  # in SMEM (``DecodeConfig.x_resident``: part-major units, the ring streams the weight alone;
  # at M = 1 and 512-column tiles x was 8 KB of every 40 KB step), the GPU tests first, then
  # the column beside the default at the 8B's gate/up and down. Prediction: 10-15% faster at
  # gate/up and down (47.2 -> ~41 us, 33.2 -> ~29); if so, the default.
  timeout 120 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_quant_matmul_gpu.py -k "persistent" 2>&1 \
    | tail -3 | tee "$OUT/quant_tests.txt"
  for shape in 28672x4096 4096x14336; do   # (M = 16's x slices pass the 48 KB limit at gate/up)
    timeout 150 python3 benchmarks/quant_matmul.py --shape $shape --ms 1 --iters 40 --reps 3 2>&1 \
      | grep "^|\|^x\[\|rror" | tee "$OUT/quant_resident_$shape.txt"
  done
  ;;
w21)
  # Issue 13 (session 21): the 8B w8a8 engine at the default share 0.9. Call 3 found the cause of
  # session 20's warm-up out-of-memory: the pool's last 1.80 GiB array finds no free block (3.64
  # GiB free, fragmented); start-up now retries with fewer pages (the arrays that fitted less
  # one) and compiles again. Prediction: one warning (~3% fewer pages), a start-up ~60 s longer,
  # then 500 x 200/180 at ~10.5k out tok/s (session 20 at 0.8: 10,428; bf16 at 0.9 in call 3:
  # 14,205).
  T8=300 offline_8b fp8_w8a8 offline_8b_w8a8_09 --num-requests 500 --input-len 200 --output-len 180 \
    --log-level INFO --json "$OUT/offline_8b_w8a8_09.json"   # (a retry compiles twice: ~100 s more)
  grep "fragmented\|after warm-up\|RESOURCE\|MemoryError\|^| \(startup\|batch1\|throughput_out\)" \
    "$OUT/offline_8b_w8a8_09.txt" | cut -c1-300
  ;;
qb)
  # Issue 13's decode target (>= 1.6x bf16; session 22, call 1: int8 1.29x, fp8 1.25x). The
  # engine's batch-1 decode runs the smallest token bucket, 16 tokens: the kernel pads 1 token to
  # 8 but 16 stay 16, and call 2/3's table ran the 8B's gate/up at 45.1 us for M = 1 against 56.9
  # for M = 16 (bf16 65.3 / 87.3). The decode step with an 8-token bucket (max_num_batched_tokens
  # 8 here; the engine's min_token_bucket) against 16, int8 and bf16 each. Prediction: int8 3.57
  # -> ~3.1 ms, bf16 4.76 -> ~4.4: ~1.4x; then min_token_bucket 8 by default for wide models.
  for mt in 8 16; do
    timeout 140 python3 benchmarks/step_floor.py llama3.1-8b --max-num-batched-tokens $mt \
      --quantization int8,none 2>&1 | table | grep "^##\|^| A \|^| B " | tee "$OUT/floor_bucket_$mt.txt"
  done
  ;;
qx4)
  # Issue 13's w8a8 throughput (session 22, call 3: XLA's fp8 dot from 128 tokens made the 8B's
  # 256-token decode steps slower than bf16's, 12.28 vs 10.65 ms, and its prefill steps 1.17x
  # faster, where the matmul table gave 1.48x / 1.80x with XLA's default options; the engine
  # compiles the 8B's buckets for cuBLAS only). w8a8 with XLA's Triton GEMMs allowed in every
  # bucket (offline.py --triton-gemm-all; the autotuner: a longer start-up) against bf16.
  # Prediction: 256-token steps ~8.5 ms, 2048 ~38 ms: ~1.25-1.3x bf16's throughput.
  T8=150 offline_8b none qx4_none --num-requests 500 --input-len 200 --output-len 180 \
    --gpu-memory-utilization 0.8 --bucket-times --json "$OUT/qx4_none.json"
  T8=330 offline_8b fp8_w8a8 qx4_w8a8 --num-requests 500 --input-len 200 --output-len 180 \
    --gpu-memory-utilization 0.8 --triton-gemm-all --bucket-times --json "$OUT/qx4_w8a8.json"
  for a in none w8a8; do
    echo "### $a"
    grep "^| \(startup\|batch1\|throughput_out\|pool\|[0-9]\)\|RESOURCE\|rror" "$OUT/qx4_$a.txt" | cut -c1-200
  done
  ;;
dd)
  # Issue 12's batch-1 target (>= 2x without speculation; session 19: 1.78x at k = 4 with the
  # from-scratch draft, acceptance 0.293, 2.16 tokens per step at 1.21x a plain step's cost).
  # Session 22 (call 4) distilled code-draft from code-small (tools/distill_draft.py; test-split
  # agreement 0.469 -> 0.524) and ships it; on CPU its k = 4 acceptance was 0.397 (2.57 tokens
  # per step). Batch 1 at k = 2, 4, 6 (the call-4 try of this table lost its rows: one output
  # file for two runs, 150 s on a cold machine). Prediction: k = 4 ~2.1x (2.57 / 1.21), k = 6
  # ~2.0x.
  timeout 300 python3 benchmarks/spec_decode.py --methods draft_model --ks 2,4,6 --workloads code \
    --num-prompts 8 --max-tokens 96 --max-num-batched-tokens 256 --max-model-len 1024 \
    --gpu-memory-utilization 0.5 --json "$OUT/spec_distilled.json" > "$OUT/spec_distilled.txt" 2>&1
  grep -v "^W\|WARNING\|^I" "$OUT/spec_distilled.txt" | tail -6
  ;;
kvf)
  # Issue 13's fp8 KV (session 22, call 3: the 8B's w8a8 + fp8 KV engine ran out of memory in
  # its warm-up, its 2048-token step needing 2,731 MiB of temporaries that grow with the pool;
  # on CPU, XLA's scatter into an fp8 pool converts the pool to f16, now scattered as bytes).
  # The GPU test asserts no pool-sized scratch for XLA-path writes and page copies, then the 8B
  # with an fp8 pool at share 0.8 against bf16 KV, at INFO (start-up now shrinks the pool by any
  # excess of the compiled peak: its warning names it). Prediction: the test passes (free
  # bitcasts), both start, fp8 KV ~1.1-1.2x the throughput (half the KV bytes at 256 running).
  timeout 120 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_kv_quant_gpu.py 2>&1 | tail -3
  for kvd in auto fp8; do
    T8=200 offline_8b none kvf_$kvd --num-requests 500 --input-len 200 --output-len 180 --kv-cache-dtype $kvd \
      --gpu-memory-utilization 0.8 --bucket-times --log-level INFO --json "$OUT/kvf_$kvd.json"
    echo "### bf16 weights, KV $kvd"
    grep "^| \(startup\|batch1\|throughput_out\|pool\|[0-9]\)\|RESOURCE\|rror\|peak\|WARNING jserve" \
      "$OUT/kvf_$kvd.txt" | cut -c1-250
  done
  ;;
qx3)
  # Issue 13's w8a8 throughput (session 22, call 2, case qx2: every w8a8 matmul through XLA's fp8
  # dot: 13,608 out tok/s against bf16's 13,516 = 1.01x, batch 1 144.8 against 215.2: below 128
  # tokens the step programs take XLA's Triton GEMMs, where the fp8 dot is slow; the matmul table
  # put XLA's [N, K] fp8 dot at 1.48x / 1.80x bf16 at M = 256 / 2048). Here XLA's dot from 128
  # tokens up (the kernels below), each step's time per token bucket, and the same with an fp8
  # KV pool (at 256 running the pages read per step rival the weights). Prediction: batch 1 back
  # to ~278 tok/s (the kernel), throughput ~1.05-1.1x (the decode steps' attention and the
  # sampler unchanged), ~1.25x with fp8 KV; the 2048 bucket ~1.6x faster than bf16's.
  for arm in none:auto fp8_w8a8:auto fp8_w8a8:fp8; do
    qz=${arm%:*} kvd=${arm#*:} name=x3_${arm/:/_}
    T8=170 offline_8b $qz $name --num-requests 500 --input-len 200 --output-len 180 --kv-cache-dtype $kvd \
      --gpu-memory-utilization 0.8 --w8a8-xla-min-m 128 --bucket-times --json "$OUT/$name.json"
    echo "### weights $qz, KV $kvd (w8a8: XLA's fp8 dot from 128 tokens)"
    grep "^| \(startup\|batch1\|throughput_out\|pool\|[0-9]\)\|RESOURCE\|rror" "$OUT/$name.txt" | cut -c1-200
  done
  timeout 110 python3 benchmarks/quant_matmul.py --shape 28672x4096 --ms 1 --iters 40 --reps 3 2>&1 \
    | grep "^|\|^x\[\|rror" | tee "$OUT/quant_resident_28672x4096.txt"
  ;;
qx2)
  # Issue 13's w8a8 throughput target (>= 1.3x bf16; session 21, call 1 (w21): w8a8 through the
  # kernels 10,295 out tok/s at share 0.9 after the fragmented pool's retry, bf16 14,205 in an
  # earlier call = ~0.72x). Every w8a8 matmul through XLA's fp8 dot with the weight [N, K] as the
  # engine keeps it (offline.py --w8a8-xla-min-m 0) against bf16 in the same call, share 0.8 (no
  # retry), then the matmul table at M = 16 / 256 / 2048 for the threshold. Prediction: w8a8
  # ~1.2-1.4x bf16's throughput (cuBLASLt's fp8 GEMM ~1.7x bf16's at the prefill buckets, the
  # decode steps' weight reads halved), batch 1 ~1.25x bf16 (M = 16 reads half the bytes).
  for qz in none fp8_w8a8; do
    T8=200 offline_8b $qz offline_8b_xla_$qz --num-requests 500 --input-len 200 --output-len 180 \
      --gpu-memory-utilization 0.8 --w8a8-xla-min-m 0 --json "$OUT/offline_8b_xla_$qz.json"
    echo "### quantization $qz (w8a8 through XLA's fp8 dot)"
    grep "^| \(startup\|batch1\|throughput_out\|pool\)\|RESOURCE\|rror" "$OUT/offline_8b_xla_$qz.txt" | cut -c1-200
  done
  timeout 150 python3 benchmarks/quant_matmul.py --shape 28672x4096 --ms 16,256,2048 --reps 3 2>&1 \
    | grep "^|\|^x\[\|rror" | tee "$OUT/quant_large_m_28672x4096.txt"
  ;;
qx)
  # Issue 13's w8a8 throughput (session 20, case qm: 500 x 200/180 at share 0.8, w8a8 10,428 out
  # tok/s against bf16's 13,505 = 0.77x; target 1.3x): the large-M matmuls, where the tiled grid
  # (one warpgroup per CTA) runs, against XLA's fp8 dot with the weight as the engine keeps it,
  # [N, K] (``reference.w8a8_matmul(native=True)``; session 21, call 2, M = 1: 47.6 / 32.4 us at
  # gate/up / down against the w8a8 kernel's 58.9 / 35.4). Session 21's try with four Ms printed
  # nothing in 100 s per shape (the table prints at the end): three Ms, 200 s each. Prediction:
  # XLA [N, K] within 0.6x of bf16's time at M >= 256 and ahead of the kernel at 16 (then the
  # dispatcher routes w8a8 to it).
  for shape in 28672x4096 4096x14336; do
    timeout 200 python3 benchmarks/quant_matmul.py --shape $shape --ms 16,256,2048 --reps 3 2>&1 \
      | grep "^|\|^x\[\|rror" | tee "$OUT/quant_large_m_$shape.txt"
  done
  ;;
qo)
  # Issue 13 (session 20): case qe's w8a8 out-of-memory at share 0.9 again, with jserve's INFO
  # lines and the warm-up's new error naming the variant and its compiled sizes (case qm: at 0.8
  # both engines started; the probe measured 1127.6 MiB for both). Prediction: it reproduces,
  # in a variant whose run allocates more than its memory analysis says (a Mosaic custom call's
  # scratch outside XLA's accounting).
  offline_8b fp8_w8a8 offline_8b_w8a8_09 --num-requests 50 --input-len 200 --output-len 20 --log-level INFO
  grep "activation\|after warm-up\|KV pool\|memory per\|RESOURCE\|MemoryError\|^| startup" \
    "$OUT/offline_8b_w8a8_09.txt" | cut -c1-700
  ;;
qs)
  # Issue 13's quantized matrix-vector kernel (target >= 85% of the HBM read rate at M <= 16;
  # the 8B's int8 decode is 1.12x bf16 of the 1.6x wanted): the config sweep, new in session 17
  # with the overlapped pipeline (one wgmma in flight, the next tile dequantized meanwhile), at
  # the 8B's fused gate/up and down shapes, M = 1. Prediction: default configs ~50-60% of the
  # read rate; the best overlapped config ~70-80% (the per-step latency halved).
  timeout 90 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_quant_matmul_gpu.py -k configs 2>&1 \
    | tail -3 | tee "$OUT/quant_configs_test.txt"   # the overlapped configs on hardware first
  for shape in 28672x4096 4096x14336; do
    timeout 240 python3 benchmarks/quant_matmul.py --shape $shape --ms 1 --sweep --reps 3 2>&1 \
      | grep "^|\|^x\[\|sweep_best\|\"kernel\"\|error" | tee "$OUT/quant_sweep_$shape.txt"
  done
  ;;
u8w)
  # Session 17's start-up changes on the 8B: cuBLAS from 32 tokens for wide models (85 s of the
  # cold start were the 32 / 64-token buckets' Triton autotuning), cuBLAS buckets on the threads,
  # and serialized step executables (a warm start skips tracing and lowering: 11.1 s of 29.7).
  # Prediction: cold ~130 s (was 244), warm ~15 s (was 36.6), the same greedy tokens cold and warm;
  # then the GPU test of the executable cache on the tiny llama.
  timeout 250 python3 benchmarks/startup.py --model llama3.1-8b --max-model-len 512 --timeout 200 \
    2>&1 | table | tee "$OUT/startup_8b.txt"
  timeout 100 python3 -m pytest -q -x tests/gpu/test_engine_gpu.py -k warm_start -p no:cacheprovider \
    2>&1 | tail -5 | tee "$OUT/gpu_test.txt"
  ;;
u8t)
  # Session 18 (after u8w's cold 87.8 s: probe 20.9, the variants' compile 58.9 with 26 programs on
  # 4 threads): 8 compile threads, and the probe's programs compiled without code optimizations
  # (their memory analysis is the same; the table shows the probe's figure, which adds the page
  # mover's, beside the compiled steps'). Prediction: probe ~14 s, compile ~35 s (15 s of it
  # lowering, serial), cold ~58 s; warm ~8 s. Then issue 16's ratio (case t).
  timeout 200 python3 benchmarks/startup.py --model llama3.1-8b --max-model-len 512 --timeout 170 \
    2>&1 | table | tee "$OUT/startup_8b.txt"
  timeout 360 python3 benchmarks/structured_outputs.py --model qwen2.5-0.5b --random-weights --rounds 2 \
    --trace > "$OUT/so_trace.txt" 2>&1; grep "^|\|^##" "$OUT/so_trace.txt" | grep -v "|---"
  ;;
u8f)
  # Session 18: the activation probe fitted from 2- and 4-layer probes (u8t: the whole-model
  # probe took 21.8 s of a 72.6 s cold start). Prediction: probe ~5 s, cold ~56 s, the fitted
  # figure ~1383.6 MiB (u8t's whole-model probe) with no "sized again", warm ~7 s. Then why case
  # sk's 8B batch-1 decode step took 27.0 ms at 1024 tokens of context (batch 64: 8.9 ms):
  # prediction: long-context attention with one live sequence (~5 ms at 128 tokens, ~27 at 1024).
  timeout 200 python3 benchmarks/startup.py --model llama3.1-8b --max-model-len 512 --timeout 170 \
    2>&1 | table | tee "$OUT/startup_8b.txt"
  timeout 200 python3 benchmarks/spec_verify_step.py --model llama3.1-8b --k 4 --batches 1,64 \
    --contexts 128,1024 --iters 20 > "$OUT/spec_verify.txt" 2>&1; grep -v "^W\|WARNING" "$OUT/spec_verify.txt" | tail -7
  ;;
d27)
  # Session 18: why u8f's 8B batch-1 decode step took 27 ms at 128 and 1024 tokens of context in
  # spec_verify_step.py's engine (ngram, max_num_seqs 64; batch 64: 6.8-8.8 ms). The plain
  # engine's batch-1 step (step_floor A/B; session 17 call 3: 4.52 ms, before the 16-token bucket
  # went to autotune level 0 for wide models), then the 16-token greedy step under level 0,
  # cuBLAS and the autotuner. Prediction: step_floor ~4.5 ms and level 0 ~ autotuned: the 27 ms
  # belongs to the speculative engine's batch-1 path.
  timeout 160 python3 benchmarks/step_floor.py llama3.1-8b 2>&1 | table | tee "$OUT/step_floor_8b.txt"
  timeout 150 python3 benchmarks/compile_ab.py --model llama3.1-8b --buckets 16 \
    --modes xla_gpu_autotune_level=0,xla_gpu_enable_triton_gemm=false,default 2>&1 \
    | grep "^|\|^##\|compiled in\|built in\|failed" | tee "$OUT/compile_ab_8b_16.txt"
  ;;
sk)
  # Issue 12's H200 rows again (session 18's call 3 ran them before two fixes): the sweep at the
  # default disable_by_batch_size 4, where a draft model's requests admitted above that load now
  # never draft and skip the draft's catch-up (call 3: draft model 0.53 / 0.76x at 16 / 256
  # running, its catch-up run every step; n-gram 0.99 / 1.33x), then one Llama-3.1-8B verify step
  # (k = 4) against a 1-token decode step, its 16-token bucket now on cuBLAS (call 3's batch-1
  # steps ran the untuned Triton GEMMs: 27 ms). Prediction: draft model ~0.95 / ~1.0x at 16 /
  # 256, n-gram ~1.0x above 4, batch 1 as before (n-gram ~1.5x, draft ~1.2x); 8B decode ~4.8 ms
  # at batch 1, verify / decode ~1.1x there and ~2.0x at 64.
  sweep4
  timeout 270 python3 benchmarks/spec_verify_step.py --model llama3.1-8b --k 4 --batches 1,64 \
    > "$OUT/spec_verify.txt" 2>&1; grep -v "^W\|WARNING" "$OUT/spec_verify.txt" | tail -8
  ;;
u8c)
  # Issue 11's 8B start-up, phase by phase (session 17: cold 244 s at the offline settings, warm
  # 36 s, 26.5 of it the step variants' compile phase), with the tracing-and-lowering share and
  # when each variant finished; then what cuBLAS would cost the 8B's 32 / 64-token buckets (their
  # Triton GEMMs are autotuned, each bucket's first program alone: the cold start's critical path).
  # Prediction: cold ~240 s, of it the probe ~60 s and the 16 / 32 / 64 buckets ~40 s each;
  # warm: lowering ~20 of ~26 s; cuBLAS at 32 / 64 within 3% of Triton, compiled in ~5 s vs ~40.
  timeout 355 python3 benchmarks/startup.py --model llama3.1-8b --max-model-len 512 --timeout 290 \
    2>&1 | table | tee "$OUT/startup_8b.txt"
  timeout 215 python3 benchmarks/compile_ab.py --model llama3.1-8b --buckets 64,32 \
    --modes xla_gpu_enable_triton_gemm=false,default 2>&1 \
    | grep "^|\|^##\|compiled in\|built in\|failed" | tee "$OUT/compile_ab_8b.txt"
  ;;
i11)
  # Issue 11's last three rows in one call on a fresh machine: Llama-3.1-8B 500 x 200/180 offline
  # (target 10k out tok/s) whose engine build over the empty default cache is the cold start-up at
  # these settings (target <= 60 s), then the warm start-up over the cache it filled (<= 15 s).
  # Prediction: cold ~90 s, offline ~10-11k out tok/s, warm ~20 s.
  timeout 400 python3 benchmarks/offline.py --model llama3.1-8b --random-weights --num-requests 500 \
    --input-len 200 --output-len 180 --max-num-seqs 256 --max-num-batched-tokens 2048 \
    --max-model-len 512 --json "$OUT/offline_llama.json" > "$OUT/offline_llama.txt" 2>&1
  grep -v "^W\|WARNING" "$OUT/offline_llama.txt" | grep -i "ready\|compiled .* variants\|tok/s\||" | tail -12
  timeout 170 python3 benchmarks/startup.py --model llama3.1-8b --max-model-len 512 --runs warm \
    --cache-dir "$HOME/.cache/jserve/xla" --timeout 160 2>&1 | table | tee "$OUT/startup_8b_warm.txt"
  ;;
mu)
  # Issue 16 (session 19): the split step's sampler takes the grammar rows' host masks as its own
  # argument (int32[R, W], filled in place by llguidance), no longer the row writer's program over
  # the logit state (session 18 call 2: staging 0.39 + LogitState.flush 0.97 ms of the grammar
  # thread's 2.7 ms per 64-row step; constrained 5.51 ms / free 2.34 ms per step, ratio 0.38 /
  # 0.43). First the upload paths apart (mask_upload.py), then case t. Prediction: the host
  # argument ~0.3 ms against logit_state ~1.3; the grammar path ~1.6 ms, constrained ~4.2 ms,
  # ratio ~0.55.
  timeout 60 python3 benchmarks/mask_upload.py --rows 64 --vocab 151936 2>&1 | grep "^|\|^##" \
    | tee "$OUT/mask_upload.txt"
  timeout 420 python3 benchmarks/structured_outputs.py --model qwen2.5-0.5b --random-weights --rounds 2 \
    --trace > "$OUT/so_trace.txt" 2>&1; grep "^|\|^##" "$OUT/so_trace.txt" | grep -v "|---"
  ;;
mus)
  # Case mu's trace again (call 2's crashed in the benchmark's mask timer, which took one
  # argument), then case sk's sweep. Predictions: mu's (ratio ~0.55) and sk's (draft model
  # ~0.95 / ~1.0x at 16 / 256 running, n-gram ~1.0x above 4).
  timeout 210 python3 benchmarks/structured_outputs.py --model qwen2.5-0.5b --random-weights --rounds 2 \
    --trace > "$OUT/so_trace.txt" 2>&1; grep "^|\|^##\|rror" "$OUT/so_trace.txt" | grep -v "|---"
  sweep4
  ;;
sa)
  # Issue 16 (session 19): why the split step's forward launch takes ~1.8 ms beside the grammar
  # thread against the fused step's 0.86 ms (case mus, round 2): CPU contention with
  # llguidance's executor (80% of the cores) or the GIL (Python's 5 ms switch interval once the
  # launch returns while the grammar thread runs Python). A/B in one call, same engine settings:
  # default, 4 grammar threads, switch interval 0.2 ms. Prediction: one of the two cuts the
  # launch to ~1.0 ms and the ratio to ~0.65. Session 21 (CPU): both llguidance calls release
  # the GIL, so the thread count should matter and the switch interval little; start-up now
  # freezes the heap (full collections no longer land in a step).
  for ab in "" "--arms threads=4" "--arms switch=0.0002"; do
    echo "### structured outputs ${ab:-default}"
    timeout 170 python3 benchmarks/structured_outputs.py --model qwen2.5-0.5b --random-weights --rounds 1 \
      --trace $ab > "$OUT/so_ab.txt" 2>&1
    grep "^|\|^##" "$OUT/so_ab.txt" | grep -v "|---" | grep "^| [0-9]\|launch\|beside\|masks\|advance\|^| step"
  done
  ;;
vt)
  # Session 19: why speculating engines with speculation off ran 0.73-0.79x of the engine
  # without speculation at 16 / 256 running in case mus (n-gram 9,682 / 20,459 against 12,474 /
  # 26,040 tok/s; draft model 9,094 / 16,064), where a CPU run of the tiny llama found their host
  # phases equal: the same sweep at 16 and 256 with each engine's step trace. Prediction: the
  # traces differ in the device's share (wait) or the step count, not in the host phases. Then
  # case vb's 8B verify step.
  timeout 230 python3 benchmarks/spec_decode.py --methods ngram,draft_model --ks 4 --workloads code \
    --num-prompts 8 --max-tokens 96 --concurrency 16,256 --max-num-seqs 256 --max-model-len 1024 \
    --max-num-batched-tokens 512 --gpu-memory-utilization 0.5 --repeat 3 --disable-by-batch-size default \
    --trace > "$OUT/spec_off_trace.txt" 2>&1
  grep -v "^W\|WARNING\|^I" "$OUT/spec_off_trace.txt" | grep -v "|---" | tail -110
  timeout 250 python3 benchmarks/spec_verify_step.py --model llama3.1-8b --k 4 --batches 1,64 \
    > "$OUT/spec_verify.txt" 2>&1; grep -v "^W\|WARNING" "$OUT/spec_verify.txt" | tail -8
  ;;
vt2)
  # Case vt's trace sweep again (its first engine's trace kept the engine alive: the next one
  # found a 0-page pool; spec_decode.py detaches it now), then issue 12's k = 2 / 4 / 6 table for
  # the bundled pair at batch 1. Predictions: as vt; acceptance ~0.40 / 0.29 / 0.23, speed-up
  # ~1.2-1.4x at each k.
  timeout 215 python3 benchmarks/spec_decode.py --methods ngram,draft_model --ks 4 --workloads code \
    --num-prompts 8 --max-tokens 96 --concurrency 16,256 --max-num-seqs 256 --max-model-len 1024 \
    --max-num-batched-tokens 512 --gpu-memory-utilization 0.5 --repeat 3 --disable-by-batch-size default \
    --trace > "$OUT/spec_off_trace.txt" 2>&1
  grep -v "^W\|WARNING\|^I" "$OUT/spec_off_trace.txt" | grep -v "|---" | grep -v "^| \(flush\|advance\|pack\) " \
    | tail -100
  timeout 245 python3 benchmarks/spec_decode.py --methods draft_model --ks 2,4,6 --workloads code \
    --num-prompts 8 --max-tokens 96 --max-num-batched-tokens 256 --max-model-len 1024 \
    --gpu-memory-utilization 0.5 --json "$OUT/spec_k.json" > "$OUT/spec_k.txt" 2>&1
  grep -v "^W\|WARNING\|^I" "$OUT/spec_k.txt" | tail -8
  ;;
vt4)
  # Issue 12 (session 24): batch 1 and 256 running in one sweep, the base engine built before
  # and after the draft model's (--base-twice: each ratio against the faster base; case dd2 found
  # 947.8 vs 1,149.1 tok/s for the same engine built first and last), with each engine's step
  # trace. Prediction: 256 running (speculation off above 4) ~0.95-0.97x after session 23's
  # cheaper spec metrics and no catch-up for requests that never draft; batch 1 ~1.7x, and the
  # trace says whether the speculating step at batch 1 waits on the device (its "wait" phase)
  # or the host (the base's 0.87 ms step is host-bound: code-small is 8 layers of 256).
  timeout 290 python3 benchmarks/spec_decode.py --methods draft_model --ks 4 --workloads code \
    --num-prompts 8 --max-tokens 96 --concurrency 1,256 --max-num-seqs 256 --max-model-len 1024 \
    --max-num-batched-tokens 512 --gpu-memory-utilization 0.5 --repeat 3 --disable-by-batch-size default \
    --trace --base-twice --json "$OUT/spec_vt4.json" > "$OUT/spec_vt4.txt" 2>&1
  grep -v "^W\|WARNING\|^I" "$OUT/spec_vt4.txt" | grep -v "|---" \
    | grep "^base\|^draft\|^code\|^| \(step\|schedule\|dispatch\|launch\|wait\|result\|update\|outputs\) \|^###"
  ;;
vt3)
  # Session 19 (case vt2): at 256 running with speculation off the draft model's engine ran
  # 0.71x, slower in every host phase (outputs +0.44 ms per step doing the same work), the n-gram
  # engine 0.99x; since then requests that never draft reserve no lookahead pages. The same
  # sweep, draft model only, first with the base engine first, then with it last. Prediction:
  # schedule within 0.2 ms of the base's; if the order flips the rest, a process effect (the
  # earlier engines' state), else the draft engine's own. Session 21 (CPU): the later engine's
  # full garbage collections (2.9 ms per step of outputs at 64 running); start-up now freezes the
  # heap. Prediction: schedule and outputs within 0.1 ms of the base's either order, ratio ~0.9.
  for order in "" "--base-last"; do
    echo "### order: ${order:-base first}"
    timeout 150 python3 benchmarks/spec_decode.py --methods draft_model --ks 4 --workloads code \
      --num-prompts 8 --max-tokens 96 --concurrency 256 --max-num-seqs 256 --max-model-len 1024 \
      --max-num-batched-tokens 512 --gpu-memory-utilization 0.5 --repeat 3 --disable-by-batch-size default \
      --trace $order > "$OUT/spec_order.txt" 2>&1
    grep -v "^W\|WARNING\|^I" "$OUT/spec_order.txt" | grep -v "|---" | grep "^draft\|^| \(step\|schedule\|dispatch\|update\|outputs\) \|^###"
  done
  ;;
vb)
  # Case sk's 8B verify step (k = 4) against the 1-token decode step at batch 1 and 64 (target
  # <= 1.15x at batch 1; prediction ~1.1x, ~2.0x at 64), then issue 12's k = 2 / 4 / 6 table for
  # the bundled pair at batch 1 (prediction: acceptance ~0.40 / 0.29 / 0.23, ~1.2x / 1.2x / 1.1x).
  timeout 260 python3 benchmarks/spec_verify_step.py --model llama3.1-8b --k 4 --batches 1,64 \
    > "$OUT/spec_verify.txt" 2>&1; grep -v "^W\|WARNING" "$OUT/spec_verify.txt" | tail -8
  timeout 300 python3 benchmarks/spec_decode.py --methods draft_model --ks 2,4,6 --workloads code \
    --num-prompts 8 --max-tokens 96 --max-num-batched-tokens 256 --max-model-len 1024 \
    --gpu-memory-utilization 0.5 --json "$OUT/spec_k.json" > "$OUT/spec_k.txt" 2>&1
  grep -v "^W\|WARNING\|^I" "$OUT/spec_k.txt" | tail -8
  ;;
i11f)
  # Issue 11's last two rows after session 18's fix (wide models: cuBLAS in every bucket; the
  # 16-token bucket had run untuned Triton GEMMs at 24.5 ms per batch-1 step): the 8B's batch-1
  # decode with its HF peer in the same call, then its cold / warm start-up at the offline
  # settings. Prediction: HF ~120 tok/s; jserve A ~4.8 ms, B ~205 tok/s (~1.7x HF); cold ~65 s
  # (session 18 call 2: 72.6 s with the level-0 compiles, 14.5 s each), warm ~7 s.
  timeout 150 python3 -c "
import sys; sys.path.insert(0, '.anchors'); import hf_peer, torch, json
m, cfg = hf_peer.build('llama3.1-8b', 'cuda', torch.bfloat16, 'sdpa')
print(json.dumps(dict(model='llama3.1-8b', hf_static_bs1_tok_s=round(hf_peer.bs1(m, cfg, 'cuda', 128, 128, 'static'), 1))), flush=True)
" 2>&1 | grep "^{\|rror" | tee "$OUT/hf8b.txt"
  timeout 150 python3 benchmarks/step_floor.py llama3.1-8b 2>&1 | table | tee "$OUT/step_floor_8b.txt"
  timeout 200 python3 benchmarks/startup.py --model llama3.1-8b --max-model-len 512 --timeout 170 \
    2>&1 | table | tee "$OUT/startup_8b.txt"
  ;;
b8)
  # Issue 11's 8B batch-1 row with its peer in one call: HF transformers' static-cache decode of the
  # Llama-3.1-8B shape, then jserve's decode step (A) and engine loop (B) with case x's GEMM A/B
  # (cuBLAS, autotune level 0) on the decode step. Prediction: HF ~135 tok/s, B ~220 (1.6x);
  # cuBLAS ~ Triton on the 8B's weight-bound decode (then cuBLAS everywhere would skip the
  # autotuner: session 17's cold 8B start-up took 244 s).
  timeout 270 python3 -c "
import sys; sys.path.insert(0, '.anchors'); import hf_peer, torch, json
m, cfg = hf_peer.build('llama3.1-8b', 'cuda', torch.bfloat16, 'sdpa')
print(json.dumps(dict(model='llama3.1-8b', hf_static_bs1_tok_s=round(hf_peer.bs1(m, cfg, 'cuda', 128, 128, 'static'), 1))), flush=True)
" 2>&1 | grep "^{\|rror" | tee "$OUT/hf8b.txt"
  timeout 290 python3 benchmarks/step_floor.py llama3.1-8b --max-num-batched-tokens 16 \
    --ab xla:xla_gpu_enable_triton_gemm=false,xla:xla_gpu_autotune_level=0 2>&1 | table | tee "$OUT/floor_ab_llama.txt"
  ;;
dk)
  # Issue 11: Qwen2.5-0.5B's decode step is the device's (A = 1.10 ms: 1000 tok/s needs < 1 ms).
  # One call, A/B patches of the decode step: the Pallas K/V write (one launch instead of two
  # XLA scatters per layer), attention without KV splits (no merge launch) and with the fused
  # combine; then the small buckets' compile under autotune level 0 (start-up: their Triton
  # GEMM autotuning is the cold start's critical path).
  timeout 300 python3 benchmarks/step_floor.py qwen2.5-0.5b --max-num-batched-tokens 16 \
    --ab kv-write-kernel,attn-nosplit,attn-fused-combine,kv-write-kernel/attn-nosplit,kv-write-kernel/attn-fused-combine 2>&1 | table | tee "$OUT/floor_dk.txt"
  timeout 250 python3 benchmarks/compile_ab.py --model qwen2.5-0.5b --buckets 64,32 \
    --modes xla_gpu_autotune_level=0,default 2>&1 \
    | grep "^|\|^##\|compiled in\|built in\|failed" | tee "$OUT/compile_ab_small.txt"
  ;;
hq)
  # Session 15, one call: the host profile of code-small's batch-1 loop, then issue 13's 8B step
  # (bf16 and int8; int8 through the Mosaic kernel and through XLA's fused convert).
  timeout 100 python3 benchmarks/host_profile.py code-small --tokens 256 --top 22 2>&1 | table \
    | tee "$OUT/host_code-small.txt"
  timeout 420 python3 benchmarks/step_floor.py llama3.1-8b --max-num-batched-tokens 16 \
    --quantization int8,none --ab quant-xla 2>&1 | table | tee "$OUT/floor_quant.txt"
  ;;
bu2)
  # Session 16: Qwen2.5-0.5B's bursts on a fixed 8192-page pool (bu1 ran out of memory at share
  # 0.5 in sessions 15 and 16: 384.62 MiB in jit_burst_step), the burst's and the decode step's
  # memory analysis against abstract pools of 2 / 8192 / 376139 pages with the optimized HLO at the
  # largest, then the HF peer's batch-1 decode in the same call (issue 11: >= 1000 tok/s, 2.5x HF).
  # Call 2 found the loop's body copying weight slices (scratch growing with the pool) and 1.66 ms
  # per token: the burst is unrolled since. Prediction: scratch ~ the step's at every pool size,
  # Qwen batch 1 ~2.2x one step at a time (~1.0 ms per token), engine build 68 -> ~100 s.
  timeout 330 python3 benchmarks/burst_decode.py qwen2.5-0.5b --steps 8 --rows 1,4,16 --num-pages 8192 \
    --analysis-pages 2,8192,376139 2>&1 | table | tee "$OUT/burst_qwen.txt"
  timeout 100 python3 benchmarks/burst_decode.py code-small --steps 8 --rows 1,16 --num-pages 8192 \
    2>&1 | table | tee "$OUT/burst_small.txt"
  timeout 150 python3 -c "
import sys; sys.path.insert(0, '.anchors'); import hf_peer, torch, json
m, cfg = hf_peer.build('qwen2.5-0.5b', 'cuda', torch.bfloat16, 'sdpa')
print(json.dumps(dict(model='qwen2.5-0.5b', hf_static_bs1_tok_s=round(hf_peer.bs1(m, cfg, 'cuda', 128, 256, 'static'), 1))), flush=True)
" 2>&1 | grep "^{" | tee "$OUT/hf.txt"
  ;;
bt)
  # Session 16, after bu2: where Qwen's burst token goes (1.62 ms against a ~1 ms decode step in
  # step_floor's A), and XLA's rematerialization pass off for step programs (compile_pool) A/B
  # on the engine build at share 0.5 (the full pool: the pass ran on every compile there).
  # .before holds the tree before the pass was turned off (carry it). Prediction: trace kernel ms
  # per burst token ~1.0 with the span ~1.6 (gaps: launches) or kernel ms ~1.6 (slower kernels);
  # build at 0.5: remat on ~150 s, off ~100 s.
  (cd .before && PYTHONPATH=/tmp/site:. timeout 220 python3 benchmarks/burst_decode.py qwen2.5-0.5b \
    --steps 8 --rows 1 --tokens 64 2>&1 | table | sed 's/^/before: /' | tee "$OUT/burst_before.txt")
  timeout 320 python3 benchmarks/burst_decode.py qwen2.5-0.5b --steps 8 --rows 1,16 --tokens 128 \
    --trace /tmp/burst_trace 2>&1 | table | tee "$OUT/burst_trace.txt"
  ;;
bh)
  # Issue 11's batch-1 row with its peer in one call: HF transformers' static-cache decode, then
  # Qwen2.5-0.5B at share 0.5, one step at a time and in bursts of 8 (call 4: 771 / 1005 tok/s).
  timeout 120 python3 -c "
import sys; sys.path.insert(0, '.anchors'); import hf_peer, torch, json
m, cfg = hf_peer.build('qwen2.5-0.5b', 'cuda', torch.bfloat16, 'sdpa')
print(json.dumps(dict(model='qwen2.5-0.5b', hf_static_bs1_tok_s=round(hf_peer.bs1(m, cfg, 'cuda', 128, 256, 'static'), 1))), flush=True)
" 2>&1 | grep "^{" | tee "$OUT/hf.txt"
  timeout 220 python3 benchmarks/burst_decode.py qwen2.5-0.5b --steps 8 --rows 1 2>&1 | table \
    | tee "$OUT/burst_qwen.txt"
  ;;
pb)
  CUDA_VISIBLE_DEVICES=0 timeout 280 python3 benchmarks/burst_decode.py llama3.1-8b --steps 8 \
    --rows 1,64,256 --max-num-seqs 256 --tokens 128 2>&1 | table | tee "$OUT/pb_1gpu.txt"
  timeout 300 python3 benchmarks/burst_decode.py llama3.1-8b --steps 8 --rows 1,64,256 \
    --max-num-seqs 256 --tokens 128 --pipeline-parallel-size 2 2>&1 | table | tee "$OUT/pb_pp2.txt"
  ;;
sv)
  for steps in 1 8; do
    OUT_DIR="$OUT/serve_$steps" PYTHON=python3 BACKENDS=openai SERVE_ARGS="--max-model-len 512 \
      --max-num-seqs 4 --num-pages 512 --num-scheduler-steps $steps" timeout 270 bash benchmarks/serve_bench.sh \
      2>&1 | grep -E "^==|^ +conc|^ +[0-9]+ |engine ready" | sed "s/^/steps $steps: /"
  done
  ;;
bu1)
  # The Qwen half of bu alone, batch 1 and 4 (what session 15's device time had left).
  timeout 175 python3 benchmarks/burst_decode.py qwen2.5-0.5b --steps 8 --rows 1,4 2>&1 | table \
    | tee "$OUT/burst.txt"
  ;;
bu)
  # Session 15: bursts (num_scheduler_steps 8) against one step at a time, same engine, batch
  # 1 / 4 / 16, code-small and Qwen2.5-0.5B (issue 11's batch-1 decode).
  # One process per model: a finished engine's pool stays allocated in its process (session 15's
  # first bu call: the second model's budget found 0 pages).
  for m in code-small qwen2.5-0.5b; do
    timeout 185 python3 benchmarks/burst_decode.py $m --steps 8 2>&1 | table | tee -a "$OUT/burst.txt"
  done
  ;;
hp)
  # Issue 11: where the batch-1 loop's host time goes (code-small: 0.20 ms on the device, 0.96 in
  # the engine), cProfile per step, both small models.
  for m in code-small qwen2.5-0.5b; do
    timeout 150 python3 benchmarks/host_profile.py $m --tokens 256 --top 22 2>&1 | table | tee "$OUT/host_$m.txt"
  done
  ;;
sw4)
  sweep4
  ;;
sw3)
  # Session 14's n-gram change (ordinary variants while speculation is off) and the threshold,
  # each point the median of 3 runs: always on, then off above 8 running requests. First the
  # toy step's input paths (session 15: a numpy input handed over in pinned host memory and
  # copied in by the program, against the executable's own host-buffer transfer).
  timeout 40 python3 benchmarks/cmdbuf_micro.py 2>/dev/null | tee "$OUT/input_paths.txt"
  for dbs in 0 8; do
    extra=""; [ "$dbs" != 0 ] && extra="--disable-by-batch-size $dbs"
    timeout 265 python3 benchmarks/spec_decode.py --methods ngram,draft_model --ks 4 --workloads code \
      --num-prompts 8 --max-tokens 96 --concurrency 1,4,16,256 --max-num-seqs 256 --max-model-len 1024 \
      --max-num-batched-tokens 512 --gpu-memory-utilization 0.5 --repeat 3 $extra \
      --json "$OUT/spec_sweep_$dbs.json" > "$OUT/spec_sweep_$dbs.txt" 2>&1
    echo "### disable_by_batch_size $dbs"; grep -v "^W\|WARNING\|^I" "$OUT/spec_sweep_$dbs.txt" | tail -16
  done
  ;;
sw2)
  # disable_by_batch_size = 8 in effect: speculation at 1-8 running requests, off at 16 and 256.
  timeout 420 python3 benchmarks/spec_decode.py --methods ngram,draft_model --ks 4 --workloads code \
    --num-prompts 8 --max-tokens 96 --concurrency 1,2,4,8,16,256 --max-num-seqs 256 --max-model-len 1024 \
    --max-num-batched-tokens 512 --gpu-memory-utilization 0.5 --disable-by-batch-size 8 \
    --json "$OUT/spec_sweep8.json" > "$OUT/spec_sweep8.txt" 2>&1
  grep -v "^W\|WARNING\|^I" "$OUT/spec_sweep8.txt" | tail -20
  ;;
sw)
  # The concurrency sweep that sets disable_by_batch_size (issue 12: >= 0.95x at 256 concurrent
  # requests), both proposers chained, share 0.5, budget 512 (fewer buckets to compile).
  timeout 500 python3 benchmarks/spec_decode.py --methods ngram,draft_model --ks 4 --workloads code \
    --num-prompts 8 --max-tokens 96 --concurrency 1,16,64,256 --max-num-seqs 256 --max-model-len 1024 \
    --max-num-batched-tokens 512 --gpu-memory-utilization 0.5 --json "$OUT/spec_sweep.json" \
    > "$OUT/spec_sweep.txt" 2>&1
  grep -v "^W\|WARNING\|^I" "$OUT/spec_sweep.txt" | tail -16
  ;;
st)
  # Staged step inputs (session 14): each step's packed host input copied into a fixed device
  # buffer, so the step's CUDA graph sees no moved input (XLA re-points every node that reads a
  # moved buffer: ~1 ms per call on Qwen's decode step, session 12). A3/B3 beside A/B.
  timeout 330 python3 benchmarks/step_floor.py code-small,qwen2.5-0.5b --max-num-batched-tokens 16 \
    --staged 2>&1 | table | tee "$OUT/floor_staged.txt"
  timeout 220 python3 benchmarks/spec_decode.py --methods ngram,draft_model --ks 4 --workloads code \
    --num-prompts 8 --max-tokens 128 --max-num-batched-tokens 256 --max-model-len 1024 --staged \
    --gpu-memory-utilization 0.5 --json "$OUT/spec_staged.json" > "$OUT/spec_staged.txt" 2>&1
  grep -v "^W\|WARNING\|^I" "$OUT/spec_staged.txt" | tail -6
  ;;
n)
  # N-gram rows chained on the device (session 14) against the same engine's synchronous loop
  # (host lookup, each step read before the next: the n-gram loop before), the draft model
  # beside; share 0.5 (call e's default-client runs at 0.9 spent their 185 s in XLA's
  # rematerialization pass and printed nothing).
  timeout 450 python3 benchmarks/spec_decode.py --methods ngram,draft_model --ks 4 --workloads code,copy \
    --num-prompts 8 --max-tokens 128 --max-num-batched-tokens 256 --max-model-len 1024 --sync-too \
    --gpu-memory-utilization 0.5 --json "$OUT/spec_chain.json" > "$OUT/spec_chain.txt" 2>&1
  grep -v "^W\|WARNING\|^I" "$OUT/spec_chain.txt" | tail -8
  ;;
e)
  # Is the small model's batch-1 loop bound by XLA re-recording the CUDA graph each call? The
  # bundled pair at batch 1 (plain, draft model k = 4, n-gram k = 4) with the default BFC client,
  # the VMM client (SKIP_TEMP in XLA_FLAGS: scratch at fixed addresses) and command buffers off.
  for mode in default vmm nocmdbuf; do
    case $mode in default) flags="";; vmm) flags=--xla_gpu_command_buffer_update_mode=SKIP_TEMP;;
      nocmdbuf) flags=--xla_gpu_enable_command_buffer=;; esac
    XLA_FLAGS=$flags timeout 185 python3 benchmarks/spec_decode.py --methods draft_model,ngram --ks 4 \
      --workloads code --num-prompts 8 --max-tokens 128 --max-num-batched-tokens 256 --max-model-len 1024 \
      --json "$OUT/spec_$mode.json" > "$OUT/spec_$mode.txt" 2>&1
    echo "### $mode"; grep -v "^W\|WARNING\|^I" "$OUT/spec_$mode.txt" | tail -5
  done
  ;;
sd)
  # Session 13, call 5: sb's speculation half at the default share, after the fix of the
  # speculative step's pool copy (an optimization barrier in draft_step).
  timeout 320 python3 benchmarks/spec_decode.py --methods draft_model --ks 4 --workloads code \
    --num-prompts 8 --max-tokens 128 --max-num-batched-tokens 256 --max-model-len 1024 --sync-too \
    --json "$OUT/spec_b1.json" > "$OUT/spec_b1.txt" 2>&1
  grep -v "^W\|WARNING\|^I" "$OUT/spec_b1.txt" | tail -8; grep -c "rematerialization" "$OUT/spec_b1.txt"
  ;;
ca)
  # Session 13: what the cold start's compiles cost under XLA's GEMM options (compile_ab.py:
  # large buckets, fresh compiles) and what they do to the decode step (step_floor.py --ab).
  timeout 300 python3 benchmarks/compile_ab.py --model qwen2.5-0.5b --buckets 2048,256 \
    --modes xla_gpu_autotune_level=0,xla_gpu_enable_triton_gemm=false,default 2>&1 \
    | grep "^|\|^##\|compiled in\|built in\|failed" | tee "$OUT/compile_ab.txt"
  timeout 270 python3 benchmarks/step_floor.py qwen2.5-0.5b --max-num-batched-tokens 16 \
    --ab xla:xla_gpu_enable_triton_gemm=false,xla:xla_gpu_autotune_level=0 2>&1 | table \
    | tee "$OUT/floor_ab_qwen.txt"
  ;;
l)
  timeout 330 python3 benchmarks/launch_trace.py --model qwen2.5-0.5b --out /tmp/launch_trace \
    > "$OUT/launch_trace.txt" 2>&1; grep "^|\|^##" "$OUT/launch_trace.txt" | head -60
  timeout 200 python3 benchmarks/cmdbuf_probe.py qwen2.5-0.5b 2>&1 | table | tee "$OUT/cmdbuf.txt"
  ;;
v)
  # The engine's 64-row step with XLA's VMM allocator and stable scratch addresses
  # (xla_gpu_command_buffer_update_mode=SKIP_TEMP in XLA_FLAGS) against the default, same call.
  vmm=--xla_gpu_command_buffer_update_mode=SKIP_TEMP
  XLA_FLAGS=$vmm timeout 190 python3 benchmarks/launch_trace.py --trace-steps 0 > "$OUT/lt_vmm.txt" 2>&1
  echo "### VMM"; grep "^##\|after warm-up\|engine ready\|pages\|VMM\|RESOURCE\|rror" "$OUT/lt_vmm.txt" | cut -c1-240
  timeout 190 python3 benchmarks/launch_trace.py --trace-steps 0 > "$OUT/lt_bfc.txt" 2>&1
  echo "### BFC"; grep "^##\|after warm-up\|engine ready\|pages\|rror" "$OUT/lt_bfc.txt" | cut -c1-240
  XLA_FLAGS=$vmm timeout 150 python3 benchmarks/cmdbuf_probe.py qwen2.5-0.5b --modes default,ALWAYS_UPDATE \
    --check 2>&1 | table | tee "$OUT/cmdbuf_vmm.txt"
  ;;
u)
  # Start-up, phase by phase: cold (empty cache) and warm, then cold with one compile thread
  # (session 11's order) in a fresh cache.
  timeout 560 python3 benchmarks/startup.py --model qwen2.5-0.5b --max-model-len 512 --timeout 250 \
    2>&1 | table | tee "$OUT/startup.txt"
  ;;
u8)
  # Issue 11's start-up target is the 8B's (<= 60 s cold, <= 15 s warm): the same phases for
  # Llama-3.1-8B (random weights) at the offline run's settings.
  timeout 580 python3 benchmarks/startup.py --model llama3.1-8b --max-model-len 512 --timeout 270 \
    2>&1 | table | tee "$OUT/startup_8b.txt"
  ;;
u1)
  timeout 560 python3 benchmarks/startup.py --model qwen2.5-0.5b --max-model-len 512 --timeout 280 \
    --compile-threads 1 --runs cold 2>&1 | table | tee "$OUT/startup_1thread.txt"
  ;;
w)
  TF_CPP_VMODULE=command_buffer_thunk=3,command_buffer_cmd=3 TF_CPP_MIN_LOG_LEVEL=0 timeout 200 \
    python3 benchmarks/cmdbuf_probe.py qwen2.5-0.5b \
    --modes default,SKIP_TEMP,xla_gpu_require_exclusive_lock=true --check > "$OUT/cmdbuf_log.txt" 2>&1
  grep "^|\|^##" "$OUT/cmdbuf_log.txt"
  awk '/^COLUMN/{col=$0; n=0} /[Uu]pdat|alloc/{if (n++ < 6) print col " :: " substr($0, 1, 200)}' \
    "$OUT/cmdbuf_log.txt" | tail -80
  ;;
q)
  for shape in 4096x14336 14336x4096; do
    timeout 100 python3 benchmarks/quant_matmul.py --shape $shape --ms 1,16,64 2>&1 | grep "^|\|^x\[\|rror" \
      | tee -a "$OUT/quant_shapes.txt"
  done
  timeout 300 python3 benchmarks/step_floor.py llama3.1-8b --max-num-batched-tokens 16 \
    --quantization none,int8 --ab quant-xla 2>&1 | table | tee "$OUT/floor_quant.txt"
  ;;
x)
  timeout 290 python3 benchmarks/step_floor.py llama3.1-8b --max-num-batched-tokens 16 \
    --ab xla:xla_gpu_enable_triton_gemm=false,xla:xla_gpu_autotune_level=0 2>&1 | table | tee "$OUT/floor_ab_llama.txt"
  ;;
a)
  timeout 300 python3 -m pytest -q -p no:cacheprovider -rf tests/gpu/test_quant_engine_gpu.py \
    tests/gpu/test_kv_quant_gpu.py tests/gpu/test_memory_gpu.py tests/gpu/test_spec_gpu.py \
    "tests/gpu/test_quant_matmul_gpu.py::test_mgpu_quant_matmul[4096-14336-w8a8-16]" \
    > "$OUT/gpu_tests.txt" 2>&1; tail -15 "$OUT/gpu_tests.txt"
  timeout 200 python3 benchmarks/step_floor.py qwen2.5-0.5b,llama3.1-8b --max-num-batched-tokens 16 \
    2>&1 | table | tee "$OUT/floor.txt"
  ;;
b)
  timeout 330 python3 benchmarks/spec_decode.py --methods draft_model --ks 2,4,6 --num-prompts 8 \
    --max-tokens 128 --max-num-batched-tokens 256 --max-model-len 1024 --sync-too --gpu-memory-utilization 0.5 \
    --json "$OUT/spec.json" > "$OUT/spec.txt" 2>&1
  grep -v "^W\|WARNING\|^I" "$OUT/spec.txt" | tail -12
  timeout 220 python3 benchmarks/spec_decode.py --methods draft_model --ks 4 --workloads code --num-prompts 16 \
    --concurrency 1,8,32,64,128,256 --max-num-seqs 256 --max-model-len 1024 --json "$OUT/spec_sweep.json" \
    > "$OUT/spec_sweep.txt" 2>&1
  grep -v "^W\|WARNING\|^I" "$OUT/spec_sweep.txt" | tail -12
  ;;
b2)
  timeout 400 python3 benchmarks/spec_decode.py --methods ngram --ks 2,4,6 --num-prompts 8 \
    --max-tokens 128 --max-num-batched-tokens 256 --max-model-len 1024 --gpu-memory-utilization 0.5 \
    --json "$OUT/spec_ngram.json" > "$OUT/spec_ngram.txt" 2>&1
  grep -v "^W\|WARNING\|^I" "$OUT/spec_ngram.txt" | tail -12
  timeout 120 python3 benchmarks/memory_budget.py --model llama3.1-8b --context 8192 2>&1 | table
  ;;
c)
  timeout 270 python3 benchmarks/disagg.py --model llama3.1-8b --random-weights --modes disagg \
    --results "$OUT/disagg.jsonl" 2>&1 | table
  timeout 270 python3 benchmarks/disagg.py --model llama3.1-8b --random-weights --modes colo \
    --results "$OUT/disagg.jsonl" 2>&1 | table
  ;;
f)
  timeout 400 python3 -m pytest -q -s -p no:cacheprovider -rf --tb=short tests/gpu/test_memory_gpu.py \
    > "$OUT/memory_tests.txt" 2>&1; grep "after warm-up\|passed\|failed\|assert\|RESOURCE" "$OUT/memory_tests.txt"
  ;;
t)
  timeout 420 python3 benchmarks/structured_outputs.py --model qwen2.5-0.5b --random-weights --rounds 2 \
    --trace > "$OUT/so_trace.txt" 2>&1; grep "^|\|^##" "$OUT/so_trace.txt" | grep -v "|---"
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
hl)
  timeout 580 python3 benchmarks/offline.py --model llama3.1-8b --random-weights --num-requests 500 \
    --input-len 200 --output-len 180 --max-num-seqs 256 --max-num-batched-tokens 2048 \
    --max-model-len 512 --json "$OUT/offline_llama.json" > "$OUT/offline_llama.txt" 2>&1
  grep -v "^W\|WARNING" "$OUT/offline_llama.txt" | tail -8
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
kv)
  timeout 580 python3 benchmarks/kv_dtype_step.py --kv-dtypes auto,fp8 2>&1 | grep "^|\|^##\|  auto\|  fp8" \
    | tee "$OUT/kv_dtype.txt"
  ;;
o)
  timeout 580 python3 benchmarks/orbax_load.py --dir /tmp/jserve_load_bench --tp 1 2>&1 \
    | grep -v "^W\|WARNING" | tail -8
  ;;
k)
  timeout 580 python3 benchmarks/spec_verify_step.py --model llama3.1-8b --k 4 --batches 1,64 \
    > "$OUT/spec_verify.txt" 2>&1; grep -v "^W\|WARNING" "$OUT/spec_verify.txt" | tail -8
  ;;
s)
  timeout 580 bash benchmarks/scale_out_runs.sh 2 2>&1 | tail -12
  ;;
esac
