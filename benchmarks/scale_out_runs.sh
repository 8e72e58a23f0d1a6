#!/usr/bin/env bash
# Scale-out (issue 14): the device calls owed, on the 2-GPU kind (nvidia-h200-x2), one per call
# (each fits the 10-minute command limit):
#
#   bash benchmarks/scale_out_runs.sh 1   # correctness: tests/gpu/test_scale_out_gpu.py (tp=2, dp=2,
#                                         # 2-process job vs one GPU) + the 2-process jserve generate
#   bash benchmarks/scale_out_runs.sh 2   # Llama-3.1-8B 500 x 200/180: tp1 vs tp2 vs dp2
#   bash benchmarks/scale_out_runs.sh 3   # the same as 2 processes (mp2), one GPU each
#   bash benchmarks/scale_out_runs.sh 4   # load time: safetensors vs orbax, 8B shape, tp=1 (writes the dirs)
#   bash benchmarks/scale_out_runs.sh 5   # the same directories restored onto tp=2
#   bash benchmarks/scale_out_runs.sh 6   # Llama-3.1-8B 500 x 200/180: tp1 vs pp2 (pipeline stages)
#   bash benchmarks/scale_out_runs.sh 7   # correctness: pp=2 on 2 GPUs vs one (tests/gpu, pp only)
#   bash benchmarks/scale_out_runs.sh 8   # tp1 vs tp2 with XLA's one-shot all-reduce kernels
#
# Targets (issue 14): tp2 >= 1.7x tp1 throughput and >= 1.5x batch-1 decode; dp2 >= 1.9x;
# pp2 >= 1.7x tp1 throughput.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH=.
nvidia-smi --query-gpu=name,driver_version --format=csv
quiet() { grep -v -i "warn\|cuda_timer\|absl"; }
case "${1:-1}" in
1)
  python3 -m pytest -q tests/gpu/test_scale_out_gpu.py 2>&1 | tail -15
  scripts/launch_multihost -n 2 -- python3 -m jserve generate --dtype float32 --tp 2 --max-tokens 32 \
    --prompt "def fibonacci(n):" 2>&1 | quiet | tail -8 ;;
2)
  timeout 580 python3 benchmarks/scale_out.py --model llama3.1-8b --random-weights --layouts tp1,tp2,dp2 \
    --num-requests 500 --input-len 200 --output-len 180 2>&1 | quiet | tail -12 ;;
3)
  timeout 580 python3 benchmarks/scale_out.py --model llama3.1-8b --random-weights --layouts tp2,mp2 \
    --num-requests 500 --input-len 200 --output-len 180 2>&1 | quiet | tail -12 ;;
4)
  timeout 580 python3 benchmarks/orbax_load.py --dir /tmp/jserve_load_bench --tp 1 --keep 2>&1 | quiet | tail -8 ;;
5)
  timeout 580 python3 benchmarks/orbax_load.py --dir /tmp/jserve_load_bench --tp 2 --reuse 2>&1 | quiet | tail -8 ;;
6)
  timeout 580 python3 benchmarks/scale_out.py --model llama3.1-8b --random-weights --layouts tp1,pp2 \
    --num-requests 500 --input-len 200 --output-len 180 2>&1 | quiet | tail -12 ;;
7)
  python3 -m pytest -q tests/gpu/test_scale_out_gpu.py -k pipeline 2>&1 | tail -15 ;;
8)
  # tp2's batch-1 step all-reduces [T, H] after every o and down projection (64 in the 8B's
  # step; offline H200 compile, session 36): NCCL's latency per call against XLA's Triton
  # one-shot kernel for single-host all-reduce (an XLA debug option, so set for the whole run).
  XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_experimental_use_collective_kernels=ALL_REDUCE" timeout 580 \
    python3 benchmarks/scale_out.py --model llama3.1-8b --random-weights --layouts tp1,tp2 \
    --num-requests 500 --input-len 200 --output-len 180 2>&1 | quiet | tail -12 ;;
esac
