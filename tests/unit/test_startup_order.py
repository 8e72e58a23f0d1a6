"""Start-up compiles every step variant over the pool's abstract shapes before it allocates the
pool (XLA's GPU autotuner needs the memory a full pool would take; RESULTS_v2_sessions_5-8.md, session 7)."""

import jax

import jserve.pool_fit as pool_fit
from jserve.runner import Runner


def test_steps_compile_before_the_pool_is_allocated(make_engine, monkeypatch):
    events = []
    allocate, compile_ = pool_fit.allocate_kv_cache, Runner.compile

    def record_allocate(*a, **k):
        events.append("allocate")
        return allocate(*a, **k)

    def record_compile(self, *a, **k):
        events.append(("compile", all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(self.kv))))
        return compile_(self, *a, **k)

    monkeypatch.setattr(pool_fit, "allocate_kv_cache", record_allocate)
    monkeypatch.setattr(Runner, "compile", record_compile)
    engine = make_engine(max_num_batched_tokens=16)
    assert events == [("compile", True), "allocate"]
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(engine.runner.kv))



def test_on_gpu_each_token_bucket_compiles_first_alone():
    """GPU start-up compiles each Triton-GEMM token bucket's first program alone (XLA's autotuner
    times that bucket's matmuls on the device), then the rest on threads (cuBLAS buckets
    included); elsewhere all on threads. The executables come back in the programs' order. A
    wide model (hidden 4096) takes cuBLAS in every bucket: no program compiles alone."""
    import threading
    from types import SimpleNamespace

    def run(platform, hidden=896):
        events = []
        opts.clear()

        class Lowered:
            def __init__(self, name):
                self.name = name

            def compile(self, options=None):
                events.append(("start", self.name, threading.current_thread() is threading.main_thread()))
                opts[self.name] = options
                return f"exe-{self.name}"

        runner = SimpleNamespace(platform=platform, compile_threads=lambda: 3, compile_timings={},
            executables=None,
            config=SimpleNamespace(model=SimpleNamespace(hidden_size=hidden)))
        programs = [(16, lambda n=n: Lowered(n)) for n in ("a", "b")] + [(64, lambda: Lowered("c"))]
        programs += [(512, lambda n=n: Lowered(n)) for n in ("d", "e")]
        done = []
        out = Runner.compile_programs(runner, programs, done=lambda i, exe, k: done.append((i, k)))
        assert out == ["exe-a", "exe-b", "exe-c", "exe-d", "exe-e"]
        assert runner.compile_timings["lower_s"] >= 0.0   # every lowering timed
        assert sorted(i for i, _ in done) == [0, 1, 2, 3, 4] and [k for _, k in done] == [1, 2, 3, 4, 5]
        return events

    opts = {}
    gpu = run("gpu")
    assert gpu[:2] == [("start", "a", True), ("start", "c", True)]   # alone, in turn
    assert {e[1] for e in gpu[2:]} == {"b", "d", "e"} and not any(e[2] for e in gpu[2:])
    # GPU: no rematerialization pass; buckets of CUBLAS_MIN_TOKENS (128) and more compile with
    # cuBLAS GEMMs
    base = {"xla_disable_hlo_passes": "rematerialization"}
    off = {**base, "xla_gpu_enable_triton_gemm": False}
    assert opts == {"a": base, "b": base, "c": base, "d": off, "e": off}
    wide = run("gpu", hidden=4096)   # cuBLAS from 32 tokens: the 16-token bucket alone is autotuned
    assert wide[0] == ("start", "a", True) and not any(e[2] for e in wide[1:])
    assert opts == {"a": base, "b": base, "c": off, "d": off, "e": off}
    assert not any(e[2] for e in run("cpu"))   # all on the pool's threads
    assert all(o == {} for o in opts.values())



def test_the_compiled_steps_peak_is_kept_for_the_start_up_log(make_engine):
    """``Runner.steps_peak``: the compiled step variants' own activation peak, which start-up
    logs beside the probe's figure (a step above it is a warning)."""
    from jserve.compile_pool import compiled_extra_bytes

    r = make_engine(max_num_batched_tokens=16).runner
    assert r.steps_peak == max(compiled_extra_bytes(c) for c in r._compiled.values()) > 0
