"""Disaggregation benchmark: prefill on GPU 0 + decode on GPU 1 against colocated dp=2.

The workload (issue 15): a steady stream of decode-heavy requests (200 in / 500 out) with
long-prompt requests (8k in / 16 out) arriving at a fixed rate, open loop (arrivals do not wait
for the engine; TTFT counts from the scheduled arrival). Each mode runs in a fresh process (its
own devices and memory) and appends one JSON line to ``--results``; the driver then prints one
table over every line in that file, so the two modes may run as two commands::

    PYTHONPATH=. python benchmarks/disagg.py --model llama3.1-8b --random-weights \
        --modes disagg,colo --results /tmp/disagg.jsonl

Per mode: decode-heavy ITL p50 / p99 (the gap before each streamed token after the first),
TTFT p50 / p99 of both kinds, total output tok/s over the run (first arrival to last finish),
and for ``disagg`` the KV handoff: bytes and loop-observed time while serving, plus a timed
copy of ``--transfer-pages`` pages through the engine's own mover (gather -> device_put ->
scatter) against the device-to-device copy ceiling (``jax.device_put`` of one contiguous buffer
of the same size, GPU 0 -> GPU 1) measured in the same process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _pct(xs: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def _schedule(ns: argparse.Namespace) -> list[tuple[float, str]]:
    """(offset seconds, kind) of every arrival, in time order: fixed intervals per kind."""
    out = [(i / ns.decode_rate, "decode") for i in range(int(ns.duration * ns.decode_rate))]
    out += [(0.5 / ns.long_rate + i / ns.long_rate, "long") for i in range(int(ns.duration * ns.long_rate))]
    return sorted(out)


def _serve(engine, ns: argparse.Namespace, schedule, rng) -> dict:
    """Run the open-loop workload; -> per-kind TTFTs, decode ITLs, tokens, wall time."""
    from jserve.sampling_params import SamplingParams

    vocab = engine.config.model.vocab_size
    kinds = {"decode": (ns.decode_in, ns.decode_out), "long": (ns.long_in, ns.long_out)}
    # every request its own random prompt: no prefix-cache hit may skip a prefill
    prompts = [rng.integers(10, vocab, kinds[kind][0]).tolist() for _, kind in schedule]
    params = {k: SamplingParams(temperature=0.0, max_tokens=out, ignore_eos=True)
              for k, (_, out) in kinds.items()}
    t0 = time.monotonic()
    arrivals: dict[str, tuple[str, float]] = {}
    seen: dict[str, tuple[int, float]] = {}            # request -> (tokens so far, last token time)
    ttft = {"decode": [], "long": []}
    itl: list[float] = []
    tokens, last_finish, nxt = 0, t0, 0
    while nxt < len(schedule) or engine.has_unfinished_requests():
        now = time.monotonic()
        while nxt < len(schedule) and t0 + schedule[nxt][0] <= now:
            offset, kind = schedule[nxt]
            rid = engine.add_request(None, prompts[nxt], params[kind], arrival_time=t0 + offset)
            arrivals[rid] = (kind, t0 + offset)
            nxt += 1
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, min(0.01, t0 + schedule[nxt][0] - time.monotonic())))
            continue
        outs = engine.step()
        now = time.monotonic()
        for o in outs:
            kind, arrival = arrivals[o.request_id]
            n = len(o.outputs[0].token_ids)
            have, last = seen.get(o.request_id, (0, arrival))
            if n > have:
                if have == 0:
                    ttft[kind].append(now - arrival)
                elif kind == "decode":
                    itl.extend([(now - last) / (n - have)] * (n - have))
                seen[o.request_id] = (n, now)
            if o.finished:
                tokens += n
                last_finish = now
    return {"ttft": ttft, "itl": itl, "tokens": tokens, "seconds": last_finish - t0}


def _transfer_rates(engine, num_pages: int, repeats: int = 5) -> dict:
    """GB/s of the engine's handoff copy of ``num_pages`` pages, and of the device-to-device
    copy ceiling (one contiguous buffer of the same bytes, prefill device -> decode device)."""
    import jax
    import jax.numpy as jnp

    h = engine.handoff
    dpool = engine.decode.scheduler.pool
    num_pages = min(num_pages, dpool.num_total, engine.prefill.scheduler.pool.num_total)
    pages = list(range(1, num_pages + 1))          # idle engine: every decode page is free
    nbytes = num_pages * h.mover.page_bytes
    runner = engine.decode.runner

    def handoff_once() -> float:
        t = time.perf_counter()
        runner.kv, received = h.mover.send(engine.prefill.runner.kv, pages, runner.kv, pages)
        jax.block_until_ready((runner.kv, received))
        return time.perf_counter() - t

    src_dev = engine.prefill.runner.mesh.devices.flat[0]
    dst_dev = engine.decode.runner.mesh.devices.flat[0]
    buf = jax.device_put(jnp.zeros((nbytes // 2,), jnp.bfloat16), src_dev)

    def ceiling_once() -> float:
        t = time.perf_counter()
        jax.block_until_ready(jax.device_put(buf, dst_dev))
        return time.perf_counter() - t

    handoff_once(), ceiling_once()                 # first calls: allocations
    hand = min(handoff_once() for _ in range(repeats))
    ceil = min(ceiling_once() for _ in range(repeats))
    return {"transfer_pages": num_pages, "transfer_mib": round(nbytes / 2**20, 1),
            "handoff_gb_s": round(nbytes / hand / 1e9, 1), "d2d_ceiling_gb_s": round(nbytes / ceil / 1e9, 1)}


def run_one(ns: argparse.Namespace, mode: str) -> dict:
    import jax
    import numpy as np

    from jserve.builder import EngineArgs, build_engine

    groups = (dict(prefill_devices=(0,), decode_devices=(1,)) if mode == "disagg"
              else dict(data_parallel_size=2))
    t0 = time.perf_counter()
    engine = build_engine(EngineArgs(
        model=ns.model, random_weights=ns.random_weights, dtype=ns.dtype, max_num_seqs=ns.max_num_seqs,
        max_num_batched_tokens=ns.max_num_batched_tokens,
        max_model_len=ns.long_in + ns.long_out + 64, **groups))
    startup = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    warm = argparse.Namespace(**{**vars(ns), "duration": 2.0})
    _serve(engine, warm, _schedule(warm), rng)      # warm-up (not measured)
    r = _serve(engine, ns, _schedule(ns), rng)
    row = {"mode": mode, "device": getattr(jax.devices()[0], "device_kind", "cpu"),
           "startup_s": round(startup, 1), "decode_reqs": len(r["ttft"]["decode"]),
           "long_reqs": len(r["ttft"]["long"]),
           "itl_p50_ms": round(_pct(r["itl"], 50) * 1e3, 2), "itl_p99_ms": round(_pct(r["itl"], 99) * 1e3, 2),
           "ttft_decode_p50_ms": round(_pct(r["ttft"]["decode"], 50) * 1e3, 1),
           "ttft_decode_p99_ms": round(_pct(r["ttft"]["decode"], 99) * 1e3, 1),
           "ttft_long_p50_ms": round(_pct(r["ttft"]["long"], 50) * 1e3, 1),
           "ttft_long_p99_ms": round(_pct(r["ttft"]["long"], 99) * 1e3, 1),
           "out_tok_s": round(r["tokens"] / r["seconds"], 1)}
    if mode == "disagg":
        s = engine.stats().kv_cache
        row["serving_transfer_gib"] = round(s["disagg_transfer_bytes"] / 2**30, 2)
        us = max(s["disagg_transfer_us"], 1)
        row["serving_transfer_gb_s"] = round(s["disagg_transfer_bytes"] / us / 1e3, 1)
        row.update(_transfer_rates(engine, ns.transfer_pages))
    return row


def _table(rows: list[dict]) -> str:
    cols = ["mode", "decode_reqs", "long_reqs", "itl_p50_ms", "itl_p99_ms", "ttft_decode_p50_ms",
            "ttft_decode_p99_ms", "ttft_long_p50_ms", "ttft_long_p99_ms", "out_tok_s"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    colo = next((r for r in rows if r["mode"] == "colo"), None)
    for r in rows:
        if r["mode"] == "disagg":
            if colo is not None:
                itl = r["itl_p99_ms"] / colo["itl_p99_ms"]
                lines.append(f"\ndecode ITL p99 disagg / colocated: {itl:.2f} "
                             f"(target <= 0.5); output tok/s: {r['out_tok_s'] / colo['out_tok_s']:.2f} "
                             f"(target >= 1.0)")
            lines.append(f"KV handoff: {r['transfer_pages']} pages ({r['transfer_mib']} MiB) at "
                         f"{r['handoff_gb_s']} GB/s; device-to-device copy ceiling "
                         f"{r['d2d_ceiling_gb_s']} GB/s "
                         f"({r['handoff_gb_s'] / r['d2d_ceiling_gb_s']:.0%}); while serving "
                         f"{r['serving_transfer_gib']} GiB moved, {r['serving_transfer_gb_s']} GB/s "
                         f"loop-observed (dispatch to bytes landed, queueing included)")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--modes", default="disagg,colo", help="disagg (prefill GPU 0, decode GPU 1), "
                    "colo (data_parallel_size=2)")
    ap.add_argument("--results", default="disagg_results.jsonl", help="JSON lines, appended")
    ap.add_argument("--one", default=None, help="run one mode in this process, print its JSON line")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals")
    ap.add_argument("--decode-rate", type=float, default=6.0, help="decode-heavy requests per second")
    ap.add_argument("--long-rate", type=float, default=0.5, help="long-prompt requests per second")
    ap.add_argument("--decode-in", type=int, default=200)
    ap.add_argument("--decode-out", type=int, default=500)
    ap.add_argument("--long-in", type=int, default=8192)
    ap.add_argument("--long-out", type=int, default=16)
    ap.add_argument("--max-num-seqs", type=int, default=128)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--transfer-pages", type=int, default=512, help="pages of the timed handoff copy")
    ns = ap.parse_args()
    if ns.one:
        print("RESULT " + json.dumps({**run_one(ns, ns.one), "args": vars(ns)}), flush=True)
        return
    passthrough = [a for a in sys.argv[1:]]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for mode in ns.modes.split(","):
        cmd = [sys.executable, str(Path(__file__).resolve()), *passthrough, "--one", mode]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            print(f"mode {mode} failed (status {proc.returncode}):\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        with open(ns.results, "a") as f:
            f.write(line[len("RESULT "):] + "\n")
    rows = [json.loads(x) for x in Path(ns.results).read_text().splitlines() if x.strip()] \
        if Path(ns.results).exists() else []
    if not rows:
        raise SystemExit("no mode ran")
    a = rows[-1]["args"]
    print(f"\n{a['model']} on {rows[-1]['device']}: decode-heavy {a['decode_in']}/{a['decode_out']} at "
          f"{a['decode_rate']}/s + long {a['long_in']}/{a['long_out']} at {a['long_rate']}/s for "
          f"{a['duration']} s; max_num_seqs {a['max_num_seqs']}, max_num_batched_tokens "
          f"{a['max_num_batched_tokens']}\n")
    print(_table(rows))


if __name__ == "__main__":
    main()
