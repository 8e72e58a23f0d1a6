"""Scale-out benchmark: throughput and batch-1 decode for tp / pp / dp / multi-process layouts.

Each layout runs in a fresh process (its own devices and memory) and prints one JSON line; the
driver prints one table with the speed-up over the first layout (the one-device baseline)::

    PYTHONPATH=. python benchmarks/scale_out.py --model llama3.1-8b --random-weights \
        --layouts tp1,tp2,pp2,dp2 --num-requests 500 --input-len 200 --output-len 180

A layout is ``tp<N>``, ``pp<N>``, ``dp<N>`` or a combination in that order (``tp2pp2``,
``tp<N>dp<M>``); ``mp<N>`` runs ``tp<N>`` as N processes of
one job (one GPU each) through scripts/launch_multihost. One layout alone (``--one tp2``) runs
in this process (the launcher starts that form).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _parse(layout: str) -> dict[str, int]:
    m = re.fullmatch(r"(?:tp(\d+))?(?:pp(\d+))?(?:dp(\d+))?|mp(\d+)", layout)
    if not m or not any(m.groups()):
        raise SystemExit(f"bad layout {layout!r}: use tp<N>, pp<N>, dp<N>, tp<N>pp<M>dp<K> or mp<N>")
    if m.group(4):
        return {"tp": int(m.group(4)), "pp": 1, "dp": 1, "processes": int(m.group(4))}
    return {"tp": int(m.group(1) or 1), "pp": int(m.group(2) or 1), "dp": int(m.group(3) or 1),
            "processes": 1}


def _run(engine, prompts, max_tokens):
    from jserve.sampling_params import SamplingParams

    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for p in prompts:
        engine.add_request(None, p, sp)
    t0, first, n = time.perf_counter(), None, 0
    while engine.has_unfinished_requests():
        for o in engine.step():
            if first is None and o.outputs[0].token_ids:
                first = time.perf_counter() - t0
            if o.finished:
                n += len(o.outputs[0].token_ids)
    return time.perf_counter() - t0, n, first


def run_one(ns: argparse.Namespace, layout: str) -> dict:
    import jax
    import numpy as np

    from jserve.builder import EngineArgs, build_engine

    lay = _parse(layout)
    t0 = time.perf_counter()
    engine = build_engine(EngineArgs(
        model=ns.model, random_weights=ns.random_weights, dtype=ns.dtype,
        tensor_parallel_size=lay["tp"], pipeline_parallel_size=lay["pp"],
        data_parallel_size=lay["dp"], max_num_seqs=ns.max_num_seqs,
        max_num_batched_tokens=ns.max_num_batched_tokens, max_model_len=ns.max_model_len))
    startup = time.perf_counter() - t0   # (processes other than 0 never get here)
    vocab = engine.config.model.vocab_size
    rng = np.random.default_rng(0)
    _run(engine, [rng.integers(10, vocab, 16).tolist()], 4)
    dt, n, ttft = _run(engine, [rng.integers(10, vocab, 16).tolist()], ns.decode_len)
    prompts = [rng.integers(10, vocab, ns.input_len).tolist() for _ in range(ns.num_requests)]
    _run(engine, prompts[:8], 8)
    dt2, n2, _ = _run(engine, prompts, ns.output_len)
    return {"layout": layout, "devices": lay["tp"] * lay["pp"] * lay["dp"], "processes": jax.process_count(),
            "device": getattr(jax.devices()[0], "device_kind", "cpu"), "startup_s": round(startup, 1),
            "batch1_decode_tok_s": round((n - 1) / (dt - ttft), 1),
            "throughput_out_tok_s": round(n2 / dt2, 1), "throughput_s": round(dt2, 2)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--layouts", default="tp1,tp2,dp2")
    ap.add_argument("--cpu", action="store_true", help="multi-process layouts on CPU (testing)")
    ap.add_argument("--one", default=None, help="run one layout in this process, print its JSON line")
    ap.add_argument("--num-requests", type=int, default=500)
    ap.add_argument("--input-len", type=int, default=200)
    ap.add_argument("--output-len", type=int, default=180)
    ap.add_argument("--decode-len", type=int, default=128)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ns = ap.parse_args()
    if ns.one:
        print("RESULT " + json.dumps(run_one(ns, ns.one)), flush=True)
        return
    passthrough = ["--model", ns.model, "--dtype", ns.dtype, "--num-requests", str(ns.num_requests),
                   "--input-len", str(ns.input_len), "--output-len", str(ns.output_len),
                   "--decode-len", str(ns.decode_len), "--max-num-seqs", str(ns.max_num_seqs),
                   "--max-num-batched-tokens", str(ns.max_num_batched_tokens),
                   "--max-model-len", str(ns.max_model_len)]
    passthrough += ["--random-weights"] if ns.random_weights else []
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    rows = []
    for layout in ns.layouts.split(","):
        cmd = [sys.executable, str(Path(__file__).resolve()), *passthrough, "--one", layout]
        lay = _parse(layout)
        if lay["processes"] > 1:
            cmd = [str(ROOT / "scripts" / "launch_multihost"), "-n", str(lay["processes"]),
                   "--port", str(_free_port()), *(["--cpu"] if ns.cpu else []), "--", *cmd]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            print(f"layout {layout} failed (status {proc.returncode}):\n{proc.stderr[-3000:]}",
                  file=sys.stderr)
            continue
        rows.append(json.loads(line[len("RESULT "):]))
    if not rows:
        raise SystemExit("no layout ran")
    base = rows[0]
    print(f"\n{ns.model}, {ns.num_requests} requests {ns.input_len}/{ns.output_len}, {base['device']}")
    print("\n| layout | devices | processes | startup s | batch-1 decode tok/s | x "
          "| throughput out tok/s | x |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        b1, tput = r["batch1_decode_tok_s"], r["throughput_out_tok_s"]
        print(f"| {r['layout']} | {r['devices']} | {r['processes']} | {r['startup_s']} | "
              f"{b1} | {b1 / base['batch1_decode_tok_s']:.2f} | "
              f"{tput} | {tput / base['throughput_out_tok_s']:.2f} |")


if __name__ == "__main__":
    main()
