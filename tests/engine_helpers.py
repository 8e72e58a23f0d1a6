"""Shared test helpers: drive an LLMEngine to completion; count compilations; record where a
step's host outputs land (jserve/host_outputs.py)."""

from __future__ import annotations

import jax


def run_engine(engine, items):
    """items: [(prompt, SamplingParams)] -> the finished RequestOutputs, in input order."""
    ids = [engine.add_request(None, p, sp) for p, sp in items]
    done = {}
    steps = 0
    while engine.has_unfinished_requests():
        steps += 1
        assert steps < 100_000, "engine made no progress"
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return [done[i] for i in ids]


def run_tokens(engine, prompts, sp):
    """Same SamplingParams for every prompt -> first completion's token ids per prompt."""
    return [o.outputs[0].token_ids for o in run_engine(engine, [(p, sp) for p in prompts])]


class CompileCounter:
    """Context manager counting backend compiles and persistent-cache hits (a hit is a new
    shape too) while it is active."""

    def __init__(self):
        self.count = 0

    def on_duration(self, event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            self.count += 1

    def on_event(self, event, **kwargs):
        if event == "/jax/compilation_cache/cache_hits":
            self.count += 1

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self.on_duration)
        jax.monitoring.register_event_listener(self.on_event)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self.on_duration)
        jax.monitoring.unregister_event_listener(self.on_event)
        return False


CONTROL_FLOW = ("stablehlo.if", "stablehlo.case", "stablehlo.while")


def assert_greedy_spec_variants_lean(engine) -> None:
    """A speculating engine's greedy verify variants lower with no conditional or loop and
    return no logprob arrays; its general variants keep their branches (a check that the
    lowering is what we think it is)."""
    runner = engine.runner
    spec = runner.spec_steps
    variants = spec.variants(runner)
    greedy = [v for v in variants if v[1]]
    assert greedy, variants
    for v in variants:
        lowered = spec._lower(runner, v)
        text = lowered.as_text()
        has_branches = any(op in text for op in CONTROL_FLOW)
        assert has_branches != v[1], (v, [op for op in CONTROL_FLOW if op in text])
        logprob_outputs = jax.tree.leaves(lowered.out_info[5:8])
        assert (len(logprob_outputs) == 0) == v[1], (v, logprob_outputs)


def address(a: jax.Array) -> int:
    """The device address of ``a``'s first addressable shard."""
    return a.addressable_shards[0].data.unsafe_buffer_pointer()


def recording(executables, seen: list) -> tuple:
    """``executables`` wrapped to append (which one, the donated tokens buffer's address, the
    tokens output's) to ``seen`` on each call."""
    def wrap(i, exe):
        def call(*args):
            where = address(args[-1][0])
            out = exe(*args)
            seen.append((i, where, address(out[4])))
            return out
        return call
    return tuple(wrap(i, exe) for i, exe in enumerate(executables))


def assert_twins_in_turn_in_place(seen: list) -> None:
    """Each executable took every other call, always on one buffer, and wrote it in place."""
    assert len(seen) >= 8 and [i for i, _, _ in seen] == [k % 2 for k in range(len(seen))]
    assert all(a == b for _, a, b in seen)
    assert len({a for i, a, _ in seen if i == 0}) == 1 and len({a for i, a, _ in seen if i == 1}) == 1
