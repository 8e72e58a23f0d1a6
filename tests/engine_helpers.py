"""Shared test helpers: drive an LLMEngine to completion; count compilations."""

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
