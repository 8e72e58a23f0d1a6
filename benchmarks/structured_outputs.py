"""Structured-output throughput: N concurrent json_schema requests vs N unconstrained ones.

The constrained batch runs first (every output must parse and validate against the schema);
the unconstrained batch then generates exactly the same number of tokens per request
(``max_tokens`` = that request's constrained length, ``ignore_eos``), so both batches have the
same shape over time and the ratio of their wall times is the cost of the constraint: by
default the schema runs on the device as a token automaton (the in-jit mask and state advance,
jserve/structured/device_grammars.py); the arm 'host' keeps it on the host path (llguidance's
masks, their upload, the split step; docs/architecture.md, "Structured outputs"). Prints one
markdown table for benchmarks/RESULTS.md.

    # CPU, the bundled model
    PYTHONPATH=. python3 benchmarks/structured_outputs.py
    # GPU, the Qwen2.5-0.5B shape with random weights (the bundled tokenizer drives the grammar:
    # its 8k ids are the only ones a grammar allows; the mask is the full 152k-token width)
    PYTHONPATH=. python3 benchmarks/structured_outputs.py --model qwen2.5-0.5b --random-weights
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import jax
import llguidance

from benchmarks.step_trace import StepTrace
from jserve.builder import EngineArgs, build_engine, default_model_path
from jserve.sampling_params import SamplingParams
from jserve.tokenizer import Tokenizer

DEFAULT_SWITCH = sys.getswitchinterval()   # 0.005 s unless the interpreter was told otherwise

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "active": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
    },
    "required": ["name", "age", "role", "active", "tags"],
    "additionalProperties": False,
}


def _validate(text: str) -> None:
    value = json.loads(text)
    try:
        import jsonschema
    except ImportError:  # not a runtime dependency: fall back to the required keys
        if set(value) != set(SCHEMA["required"]):
            raise ValueError(f"keys {sorted(value)}") from None
        return
    jsonschema.validate(value, SCHEMA)


def _run(engine, items) -> tuple[float, list]:
    ids = [engine.add_request(None, p, sp) for p, sp in items]
    done = {}
    t0 = time.perf_counter()
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                done[o.request_id] = o
    return time.perf_counter() - t0, [done[i] for i in ids]


class _Inline:
    """An executor that runs each job at submit: the engine's grammar work then runs before the
    split forward's launch instead of beside it (arm 'serial')."""

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        f: Future = Future()
        f.set_result(fn(*args))
        return f


def _arm(spec: str) -> tuple[str, int | None, float, str]:
    """'default' | 'host' | 'threads=N' | 'switch=S' | 'serial' | 'fused' | 'put-joint' |
    'no-ahead' | 'no-read-first' -> (name, executor threads or None, switch interval, the mode:
    'beside', 'host', 'serial', 'fused', 'put-joint', 'no-ahead' or 'no-read-first'; every arm
    but 'default' runs the grammar on the host path)."""
    key, _, value = spec.partition("=")
    if key in ("default", "host", "serial", "fused", "put-joint", "no-ahead", "no-read-first") and not value:
        return spec, None, DEFAULT_SWITCH, "beside" if key == "default" else key
    if key == "threads" and value.isdigit():
        return spec, int(value), DEFAULT_SWITCH, "beside"
    if key == "switch" and value:
        return spec, None, float(value), "beside"
    raise SystemExit(f"--arms: unknown arm {spec!r} (default, host, threads=N, switch=S, serial, fused, "
                     "put-joint, no-ahead, no-read-first)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="HF dir or named shape (default: the bundled model)")
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--tokenizer", default=None,
                    help="tokenizer dir when the model has none (default: the bundled model's)")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--rounds", type=int, default=2, help="timed rounds (the first round warms up)")
    ap.add_argument("--trace", action="store_true",
                    help="print where each batch's step time goes (benchmarks/step_trace.py)")
    ap.add_argument("--arms", default="default",
                    help="A/B arms, run in turn within every round of the one process (a machine "
                         "that drifts during the call moves every arm alike): 'default' (the "
                         "schema's token automaton on the device), 'host' (the host path: "
                         "llguidance masks; the arms below all take it), "
                         "'threads=N' (llguidance's executor threads; default 80%% of the cores), "
                         "'switch=S' (sys.setswitchinterval seconds; Python's default 0.005: how "
                         "long a thread returning from a launch may wait for the GIL), 'serial' "
                         "(the grammar work before the split forward's launch, not beside it: "
                         "the launch's own cost), 'fused' (neither the masks put ahead nor "
                         "the split step: the engine reads the step in flight, fills the masks, "
                         "then launches the fused step), 'no-ahead' (no masks put ahead "
                         "beside the plan: the split step with the masks filled beside the "
                         "forward's launch, session 29's order), 'no-read-first' (a step in "
                         "flight still running is never waited for before the plan), "
                         "'put-joint' (the split step's packed input uploaded by jax.device_put, "
                         "a fresh buffer each call, instead of copied into the bucket's fixed "
                         "buffer)")
    ns = ap.parse_args()
    arms = [_arm(a) for a in ns.arms.split(",")]
    n = ns.num_requests
    eng = build_engine(EngineArgs(model=ns.model, random_weights=ns.random_weights, dtype=ns.dtype,
                                  max_num_seqs=n, max_model_len=512))
    if eng.tokenizer is None:
        eng.tokenizer = Tokenizer.from_dir(ns.tokenizer or default_model_path())
    prompts = [f"# record {i}: a user of the system as JSON\nrecord = " for i in range(n)]
    mask_s = [0.0]
    masks = eng.constraints.masks

    def timed_masks(*args, **kwargs):
        t = time.perf_counter()
        try:
            return masks(*args, **kwargs)
        finally:
            mask_s[0] += time.perf_counter() - t

    eng.constraints.masks = timed_masks
    trace = StepTrace.attach(eng) if ns.trace else None
    traces = []
    rows = []
    can_split, covers, ahead = eng.runner.can_split, eng.grammar.covers, eng.grammar._advance_and_put
    read_first = eng._read_first
    device = eng.device_grammars
    on_device = [0]   # requests that took a device automaton in the round
    if device is not None:
        t = time.perf_counter()
        eng.compile_grammar(SamplingParams(structured_outputs={"json": SCHEMA}))
        built = eng.automaton_compiler().compile(("json", json.dumps(SCHEMA), False))
        print(f"  token automaton of the schema: {'none' if built is None else built.num_states} "
              f"states, compiled in {time.perf_counter() - t:.2f} s", flush=True)
        add = device.add
        device.add = lambda req: add(req) and (on_device.__setitem__(0, on_device[0] + 1) or True)
    split = eng.runner.split
    staged = split.stage_joint

    def put(host):
        return jax.device_put(host, eng.runner._replicated)
    executors = {t: llguidance.LLExecutor() if t is None else llguidance.LLExecutor(num_threads=t)
                 for t in {a[1] for a in arms}}   # one per thread count, kept across rounds
    for r, (name, threads, switch, mode) in ((r, a) for r in range(ns.rounds + 1) for a in arms):
        eng.constraints._executor = executors[threads]
        eng.device_grammars = device if name == "default" else None
        sys.setswitchinterval(switch)
        if mode == "serial":
            eng.grammar.thread = _Inline()
        elif isinstance(eng.grammar.thread, _Inline):
            eng.grammar.thread = None   # the engine starts its own thread again
        eng.runner.can_split = (lambda out: False) if mode == "fused" else can_split
        no_ahead = mode in ("fused", "no-ahead")
        eng.grammar.covers = (lambda *_: False) if no_ahead else covers
        eng.grammar._advance_and_put = (lambda _, reqs, __: eng.grammar.advance(reqs)) if no_ahead else ahead
        split.stage_joint = put if mode == "put-joint" else staged
        eng._read_first = eng._in_flight_done if mode == "no-read-first" else read_first
        mask_s[0] = on_device[0] = 0.0
        cons = [(p, SamplingParams(temperature=ns.temperature, seed=1000 * r + i, max_tokens=ns.max_tokens,
                                   structured_outputs={"json": SCHEMA}))
                for i, p in enumerate(prompts)]
        if trace:
            trace.reset()
        t_cons, outs = _run(eng, cons)
        if trace and r:
            traces.append(trace.table(f"round {r}, {name}, constrained"))
            trace.reset()
        lens = [len(o.outputs[0].token_ids) for o in outs]
        bad = 0
        for o in outs:
            try:
                _validate(o.outputs[0].text)
            except Exception:   # noqa: BLE001 - counted and reported
                bad += 1
        free = [(p, SamplingParams(temperature=ns.temperature, seed=1000 * r + i, max_tokens=k,
                                   ignore_eos=True))
                for i, (p, k) in enumerate(zip(prompts, lens, strict=True))]
        t_free, _ = _run(eng, free)
        if trace and r:
            traces.append(trace.table(f"round {r}, {name}, free"))
        if r:
            rows.append((f"{r} {name}", t_cons, t_free, sum(lens), bad, mask_s[0], on_device[0]))
    dev = jax.devices()[0]
    print(f"\n## structured outputs: {n} json_schema requests vs {n} unconstrained, same tokens per "
          f"request ({ns.model or 'code-small'}, {dev.platform} {dev.device_kind})")
    print("| round | tokens | constrained tok/s | free tok/s | ratio | host mask s | on device | invalid |")
    print("|---|---|---|---|---|---|---|---|")
    for k, tc, tf, toks, bad, ms, dev_n in rows:
        print(f"| {k} | {toks} | {toks / tc:.0f} | {toks / tf:.0f} | {tf / tc:.2f} | {ms:.2f} | {dev_n:.0f} "
              f"| {bad} |")
    for t in traces:
        print(t)


if __name__ == "__main__":
    main()
