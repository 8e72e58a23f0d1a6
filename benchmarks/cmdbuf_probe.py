"""Why does calling the compiled decode step cost the host about as much as the device runs it?

The profiler trace of the Qwen2.5-0.5B decode step (H200, RESULTS.md, v2 section) shows each call
spending ~1 ms in ``command_buffer::update`` before ``cuGraphLaunch``: XLA re-records the CUDA
graph's nodes whose buffers moved since the last call. This probe times one call on an idle
device with different inputs held fixed, to find which buffers move:

  in place     the engine's way since session 6: prev_tokens is donated and the step writes the
               new tokens into it, so its address never changes
  moving       a new prev_tokens buffer each call (the engine's way before session 6)
  held         the previous call's host-facing token output alive during the call (the
               overlapped loop's way: a fresh output cannot take the address it had)
  numpy input  the packed input handed over as a host array (the engine's way)
  device_put   the packed input uploaded by ``jax.device_put`` right before the call (timed too)
  staged       the host array copied into a fixed device buffer (``jserve.staged_input``), then
               the step called on that buffer (both timed): the step's graph sees no moved input
and two programs of the step (``--modes``): "default", the engine's since session 58, whose
host-facing outputs are donated buffers written in place, two in turn (jserve/host_outputs.py;
a twin executable per buffer where ``TWIN_MAX_TOKENS`` says; session 58's case w2 found the held
fresh output moving on every call: 35 graph updates in 35 calls), and "fresh", the program
before it;
  + the XLA option ``xla_gpu_command_buffer_update_mode`` for each of the above (``--modes``, on
    the fresh program;
    given only to the compile, the client keeps its BFC allocator; set in ``XLA_FLAGS`` before
    the start, it switches the client to the VMM allocator, which the option's VA remapping needs)

``--check`` also runs each executable over a chain of calls whose inputs change every call
(numpy input, context 300, 301, ...; each call's token feeds the next) and compares its tokens
with the first mode's: a mode that skips re-pointing a graph node at a moved buffer reads a stale
input or scratch and diverges.

Run on the GPU (from the repository root, PYTHONPATH=.), optionally with
``TF_CPP_VMODULE=command_buffer_thunk=3 TF_CPP_MIN_LOG_LEVEL=0`` to have XLA log the update:

    python3 benchmarks/cmdbuf_probe.py qwen2.5-0.5b
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.step_floor import decode_inputs, engine_options
from jserve.builder import EngineArgs, build_engine
from jserve.staged_input import StagedInputs
from jserve.step_program import StepVariant


def buffer_addresses(tree) -> tuple[int, ...]:
    """The device address of every array in ``tree`` (its first addressable shard's)."""
    return tuple(leaf.addressable_shards[0].data.unsafe_buffer_pointer() for leaf in jax.tree.leaves(tree))


def moved(addresses: list[tuple[int, ...]]) -> list[int]:
    """The output leaves whose address differs between some two consecutive calls."""
    return [i for i in range(len(addresses[0]))
            if any(a[i] != b[i] for a, b in zip(addresses, addresses[1:], strict=False))]


def idle_call_ms(engine, step, in_place: bool = True, n: int = 30, context: int = 300, hold: bool = False,
                 numpy_input: bool = False, put_input: bool = False, staged: bool = False,
                 addresses: list | None = None) -> float:
    """Median host ms of one call of ``step`` (a batch-1 decode at ``context``) started on an
    idle device. Only the state the next call takes (kv, slot table, tokens) outlives a call,
    unless ``hold``: the previous call's host-facing token output stays alive during the call
    (the overlapped loop reads it only after dispatching the next step; a fresh output cannot
    take the address it had). ``numpy_input``: the packed input goes to the call as a host array,
    uploaded by the call (the engine's way); ``put_input``: uploaded by ``jax.device_put`` just
    before the call (timed with it). ``addresses``: a list that gets every call's output
    addresses (``buffer_addresses``)."""
    r = engine.runner
    joint = decode_inputs(engine, context)[-1]   # (batch 1: one buffer)
    stage = StagedInputs([joint.shape[0]], r._replicated) if staged else None
    if numpy_input or put_input or staged:
        joint = np.asarray(joint)
    kv, table, tokens = r.kv, r.slot_table, r._prev_tokens
    times, held = [], None
    for i in range(n + 5):
        prev = tokens if in_place else jnp.copy(tokens)
        jax.block_until_ready((kv, table, prev))
        t0 = time.perf_counter()
        arg = jax.device_put(joint) if put_input else joint
        if staged:
            arg = stage.put(joint)
        res = step(r.params, kv, None, table, prev, arg, None)
        if i >= 5:
            times.append(time.perf_counter() - t0)
        if addresses is not None:
            addresses.append(buffer_addresses(res))
        kv, table, tokens, held = res[0], res[2], res[3], res[4] if hold else None
        del res, prev, arg   # (session 56: the loop's variables had kept every output alive)
    jax.block_until_ready((tokens, held))
    r.kv, r.slot_table, r._prev_tokens = kv, table, tokens
    return float(np.median(times)) * 1e3


def compile_options(mode: str) -> dict:
    """A ``--modes`` entry -> XLA options: an update mode (``SKIP_TEMP``) or ``NAME=VALUE``."""
    if "=" not in mode:
        return {"xla_gpu_command_buffer_update_mode": mode}
    name, _, value = mode.partition("=")
    return {name: {"true": True, "false": False}.get(value.lower(), value)}


def chain_tokens(engine, step, n: int = 24, context: int = 300) -> list[int]:
    """The tokens of ``n`` chained batch-1 decode calls of ``step`` at contexts ``context``,
    ``context`` + 1, ... (numpy input, a fresh one every call), from the same starting state
    each time it is run."""
    r = engine.runner
    kv, table = r.kv, r.slot_table
    tokens = jnp.zeros_like(r._prev_tokens)
    inputs = [np.asarray(decode_inputs(engine, context + i)[-1]) for i in range(n)]
    out_tokens = []
    for joint in inputs:
        kv, _, table, tokens, out, *_ = step(r.params, kv, None, table, tokens, joint, None)
        out_tokens.append(int(np.asarray(out).reshape(-1)[0]))
    r.kv, r.slot_table, r._prev_tokens = kv, table, jnp.zeros_like(tokens)
    return out_tokens


def compiled(engine, variant: StepVariant, mode: str):
    """``variant``'s step program before session 58 (fresh host-facing outputs; a loaded
    executable of its own) compiled with the engine's XLA options and ``mode``'s (as ``--modes``;
    "fresh": none more)."""
    options = engine_options(engine, variant) | ({} if mode == "fresh" else compile_options(mode))
    return engine.runner.lower_step(variant, host_out=False).compile(compiler_options=options)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--modes", default="default,fresh",
                    help="default: the engine's step (host outputs in place; twins as "
                    "host_outputs.TWIN_MAX_TOKENS says); "
                    "fresh: the program before session 58 (fresh host outputs); else that program "
                    "compiled with an update mode (SKIP_TEMP) or one XLA option (NAME=VALUE)")
    ap.add_argument("--check", action="store_true", help="compare chained tokens across modes")
    ap.add_argument("--addresses", action="store_true",
                    help="per column, the output leaves whose device address moves between calls")
    ns = ap.parse_args()
    eng = build_engine(EngineArgs(model=ns.model, random_weights=True, dtype="bfloat16", max_num_seqs=16,
                                  max_num_batched_tokens=16, max_model_len=1024, num_pages=512))
    r = eng.runner
    variant = StepVariant(r.bucket_for(1)[0], False, True, True)
    steps = {mode: r._compiled[variant] if mode == "default" else compiled(eng, variant, mode)
             for mode in ns.modes.split(",")}
    print(f"\n## {ns.model} ({jax.devices()[0].device_kind}): host ms of one decode-step call, idle device")
    columns = {"in place": dict(in_place=True), "moving": dict(in_place=False),
               "held": dict(in_place=True, hold=True), "numpy": dict(in_place=True, numpy_input=True),
               "held+numpy": dict(in_place=True, hold=True, numpy_input=True),
               "device_put": dict(in_place=True, put_input=True),
               "staged": dict(in_place=True, staged=True),
               "held+staged": dict(in_place=True, hold=True, staged=True)}
    heads = ["prev_tokens in place", "prev_tokens moving", "in place, previous output held",
             "in place, numpy input", "held + numpy input (the engine's loop)", "device_put input + call",
             "staged input + call", "held + staged"]
    print("| compile | " + " | ".join(heads) + " |\n|---|" + "---|" * len(heads))
    moves: dict[str, str] = {}
    for name, step in steps.items():
        cols = []
        for col in columns:
            # A marker between columns in the log (XLA's command-buffer log goes to stderr too).
            print(f"COLUMN {name} / {col}", file=sys.stderr, flush=True)
            seen: list | None = [] if ns.addresses else None
            cols.append(idle_call_ms(eng, step, addresses=seen, **columns[col]))
            if seen:   # (the engine's twins: each executable's calls against its own previous call)
                moves[f"{name} / {col}"] = (f"{moved(seen[5::2])} / {moved(seen[6::2])} of {len(seen[0])}"
                                            if len(getattr(step, "executables", ())) > 1
                                            else f"{moved(seen[5:])} of {len(seen[0])}")
        print(f"| {name} | " + " | ".join(f"{c:.3f}" for c in cols) + " |", flush=True)
    if moves:
        print("\n| compile / column | output leaves whose address moves between calls |\n|---|---|")
        for key, val in moves.items():
            print(f"| {key} | {val} |")
    if ns.check:
        chains = {name: chain_tokens(eng, step) for name, step in steps.items()}
        ref_name, ref = next(iter(chains.items()))
        print(f"\n| mode | chained tokens equal to {ref_name}'s | first tokens |\n|---|---|---|")
        for name, toks in chains.items():
            same = sum(a == b for a, b in zip(toks, ref, strict=True))
            print(f"| {name} | {toks == ref} ({same}/{len(ref)}) | {toks[:6]} |", flush=True)


if __name__ == "__main__":
    main()
