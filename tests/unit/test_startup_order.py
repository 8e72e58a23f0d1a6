"""Start-up compiles every step variant over the pool's abstract shapes before it allocates the
pool (XLA's GPU autotuner needs the memory a full pool would take; RESULTS_v2_sessions_5-8.md, session 7)."""

import jax

import jserve.builder as builder
from jserve.runner import Runner


def test_steps_compile_before_the_pool_is_allocated(make_engine, monkeypatch):
    events = []
    allocate, compile_ = builder.allocate_kv_cache, Runner.compile

    def record_allocate(*a, **k):
        events.append("allocate")
        return allocate(*a, **k)

    def record_compile(self, *a, **k):
        events.append(("compile", all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(self.kv))))
        return compile_(self, *a, **k)

    monkeypatch.setattr(builder, "allocate_kv_cache", record_allocate)
    monkeypatch.setattr(Runner, "compile", record_compile)
    engine = make_engine(max_num_batched_tokens=16)
    assert events == [("compile", True), "allocate"]
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(engine.runner.kv))
