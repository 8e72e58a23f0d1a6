#!/usr/bin/env bash
# Serving benchmark: `jserve serve` (random weights of a named shape) + `jserve bench`.
#
# Default = the published loop shape: Qwen2.5-0.5B, 16 requests, 128 input / 64 output tokens,
# concurrency 1, 2, 4, over HTTP (OpenAI completions, streamed) and then gRPC. Prints one table
# per front-end and writes JSON next to it. Run on the GPU machine from the repository root:
#
#     bash benchmarks/serve_bench.sh
#
# Knobs (environment): MODEL, NUM_PROMPTS, INPUT_LEN, OUTPUT_LEN, CONCURRENCY, PORT, GRPC_PORT,
# OUT_DIR, PYTHON, SERVE_ARGS (extra `jserve serve` flags), BACKENDS ("openai grpc").
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=${MODEL:-qwen2.5-0.5b}
NUM_PROMPTS=${NUM_PROMPTS:-16}
INPUT_LEN=${INPUT_LEN:-128}
OUTPUT_LEN=${OUTPUT_LEN:-64}
CONCURRENCY=${CONCURRENCY:-1,2,4}
PORT=${PORT:-8000}
GRPC_PORT=${GRPC_PORT:-50051}
OUT_DIR=${OUT_DIR:-benchmarks/results}
PYTHON=${PYTHON:-.venv/bin/python}
BACKENDS=${BACKENDS:-openai grpc}
SERVE_ARGS=${SERVE_ARGS:-}
LOG="$OUT_DIR/serve_${MODEL//\//_}.log"

mkdir -p "$OUT_DIR"
# shellcheck disable=SC2086  # SERVE_ARGS is a list of flags
"$PYTHON" -m server serve --model "$MODEL" --random-weights --port "$PORT" --grpc-port "$GRPC_PORT" \
    $SERVE_ARGS >"$LOG" 2>&1 &
SERVER_PID=$!
cleanup() {
    if kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID"
        wait "$SERVER_PID" || true
    fi
}
trap cleanup EXIT

echo "serve_bench: starting jserve serve --model $MODEL (log: $LOG)"
"$PYTHON" - "$PORT" "$SERVER_PID" <<'PY'
import os, sys, time, urllib.request
port, pid = sys.argv[1], int(sys.argv[2])
deadline = time.monotonic() + 1800
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit("serve_bench: the server exited during start-up (see the log)")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
            if r.status == 200:
                sys.exit(0)
    except OSError:
        pass
    time.sleep(1)
sys.exit("serve_bench: the server did not become healthy in 30 minutes")
PY
grep -E "KV pool|compiled|start-up|engine ready" "$LOG" || true

for backend in $BACKENDS; do
    out="$OUT_DIR/serve_${MODEL//\//_}_${backend}.json"
    echo
    echo "== $backend: $NUM_PROMPTS requests, $INPUT_LEN in / $OUTPUT_LEN out, concurrency $CONCURRENCY =="
    "$PYTHON" -m server bench --backend "$backend" --base-url "http://127.0.0.1:$PORT" \
        --grpc-target "127.0.0.1:$GRPC_PORT" --num-prompts "$NUM_PROMPTS" --input-len "$INPUT_LEN" \
        --output-len "$OUTPUT_LEN" --concurrency "$CONCURRENCY" --warmup 2 --result-json "$out"
done
