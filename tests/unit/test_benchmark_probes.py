"""The step-cost probes in benchmarks/ (step_floor.py, cmdbuf_probe.py) call the compiled decode
step directly, outside the runner, so a change of the step's arguments breaks them silently
until the next GPU run. Run each once on the tiny llama fixture (one engine, CPU)."""

import dataclasses
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from fixture_paths import GOLDEN

from benchmarks import cmdbuf_probe, step_floor
from benchmarks.decode_stream import stream
from benchmarks.ring_cost import direct_want
from jserve.builder import EngineArgs, build_engine
from jserve.staged_input import StagedInputs
from jserve.step_program import StepVariant


@pytest.fixture(scope="module")
def engine():
    return build_engine(EngineArgs(model=str(GOLDEN / "llama"), dtype="float32", max_model_len=64,
                                   max_num_seqs=4, max_num_batched_tokens=16, num_pages=32))


def test_step_floor_decodes_several_rows(engine):
    """--rows: a step of 3 decode rows at 60 tokens, each in its own slot and pages; their 12
    page-table entries overflow the bucket's diff list, so they reach the device slot table over
    two calls before the timed ones."""
    r = engine.runner
    ps = engine.config.cache.page_size
    buffers = step_floor.decode_inputs(engine, context=60, rows=3)
    pp = -(-60 // ps)
    assert len(buffers) == -(-3 * pp // len(r.layout(r.bucket_for(3)[0]).new_buffers()[2]["pt_diff"])) > 1
    assert step_floor.floor_a(engine, n=2, context=60, rows=3)[0] > 0
    table = np.asarray(r.slot_table)
    for row in range(3):
        assert table[row, :pp].tolist() == list(range(1 + row * pp, 1 + (row + 1) * pp))
    with pytest.raises(ValueError, match="do not fit"):
        step_floor.decode_inputs(engine, context=60, rows=9)


def test_step_floor_calls_the_decode_step(engine):
    ms, host_ms, idle_ms, kernels = step_floor.floor_a(engine, n=2, context=20)
    assert ms > 0 and host_ms > 0 and idle_ms > 0 and kernels >= 0
    staged = StagedInputs([engine.runner.layout(engine.runner.bucket_for(1)[0]).int_size
                           + engine.runner.layout(engine.runner.bucket_for(1)[0]).float_size],
                          engine.runner._replicated)
    assert step_floor.floor_a(engine, n=2, context=20, staged=staged)[0] > 0
    assert np.asarray(engine.runner._prev_tokens).shape[0] >= 1
    # --ab xla:NAME=VALUE recompiles the decode step with that XLA option (parsed as compile_ab's)
    decode = StepVariant(engine.runner.bucket_for(1)[0], False, True, True)
    patched = step_floor._recompiled(engine, decode, "xla:xla_gpu_enable_triton_gemm=false")
    assert step_floor.floor_a(engine, step=patched, n=2, context=20)[0] > 0
    with pytest.raises(ValueError, match="NAME=VALUE"):
        step_floor._recompiled(engine, decode, "xla:no_value")
    # --ab attn-nosplit / attn-fused-combine / attn-minblocks1 patch the GPU attention's decode plan
    from pallas_kernels.ragged_paged_attention import gpu as attn_gpu

    def dec(c):
        return c.decode if isinstance(c, attn_gpu.GpuPlan) else c

    for shape in ((2, 16, 14, 2, 16, 64), (16, 16, 14, 2, 16, 64)):   # tokens, seqs, heads q/kv, ...
        base = attn_gpu.default_config(*shape)
        nosplit = step_floor.attention_plan("attn-nosplit", attn_gpu.default_config)(*shape)
        fused = step_floor.attention_plan("attn-fused-combine", attn_gpu.default_config)(*shape)
        one = step_floor.attention_plan("attn-minblocks1", attn_gpu.default_config)(*shape)
        assert dec(base).num_splits > 1 and dec(nosplit).num_splits == 1
        assert dec(fused).fused_combine and dec(fused).num_splits == dec(base).num_splits
        assert dec(base).min_blocks_per_split == 2 and dec(one).min_blocks_per_split == 1
        assert dataclasses.replace(dec(one), min_blocks_per_split=2) == dec(base)
        assert type(nosplit) is type(base)
        if isinstance(base, attn_gpu.GpuPlan):
            assert nosplit.prefill == base.prefill
    assert step_floor.floor_a(engine, step=step_floor._recompiled(engine, decode, "attn-nosplit"),
                              n=2, context=20)[0] > 0


def test_cmdbuf_probe_calls_the_decode_step(engine):
    r = engine.runner
    step = r._compiled[StepVariant(r.bucket_for(1)[0], False, True, True)]
    assert cmdbuf_probe.idle_call_ms(engine, step, in_place=True, n=1, context=20) > 0
    assert cmdbuf_probe.idle_call_ms(engine, step, in_place=False, n=1, context=20) > 0
    assert cmdbuf_probe.idle_call_ms(engine, step, put_input=True, n=1, context=20) > 0
    # The chained check: inputs that change every call give the same tokens on a second run.
    first = cmdbuf_probe.chain_tokens(engine, step, n=3, context=20)
    assert len(first) == 3 and cmdbuf_probe.chain_tokens(engine, step, n=3, context=20) == first
    # --modes fresh: the step program before session 58 (fresh host outputs), the same tokens
    fresh = cmdbuf_probe.compiled(engine, StepVariant(r.bucket_for(1)[0], False, True, True), "fresh")
    assert cmdbuf_probe.chain_tokens(engine, fresh, n=3, context=20) == first
    assert cmdbuf_probe.idle_call_ms(engine, step, in_place=True, n=1, context=20, hold=True,
                                     numpy_input=True) > 0
    assert cmdbuf_probe.idle_call_ms(engine, step, n=2, context=20, hold=True, staged=True) > 0
    seen = []
    cmdbuf_probe.idle_call_ms(engine, step, n=2, context=20, hold=True, addresses=seen)
    assert len(seen) == 7 and len({len(a) for a in seen}) == 1 and all(x > 0 for x in seen[0])
    assert cmdbuf_probe.moved([(1, 2, 3), (1, 5, 3), (1, 5, 4)]) == [1, 2]


def test_host_output_arms_time_like_the_engines_step(engine):
    """step_floor --host-outputs: the decode step before session 58 (fresh host outputs) and in
    place through one executable (on a GPU also with twins), each timed back to back as the
    engine's own."""
    r = engine.runner
    decode = StepVariant(r.bucket_for(1)[0], False, True, True)
    arms = step_floor.host_output_arms(engine, decode)
    assert len(arms) == 2 and all(fn is not r._compiled[decode] for fn in arms.values())   # (CPU)
    for fn in arms.values():
        assert step_floor.floor_a(engine, step=fn, n=2, context=20)[0] > 0


def test_launch_trace_reads_a_profiler_trace(tmp_path):
    """benchmarks/launch_trace.py's reader of the perfetto trace the profiler writes."""
    import glob

    import jax

    from benchmarks.launch_trace import top_host_events

    f = jax.jit(lambda x: jnp.sin(x) @ x)
    x = jnp.ones((64, 64))
    f(x).block_until_ready()
    with jax.profiler.trace(str(tmp_path), create_perfetto_trace=True):
        for _ in range(3):
            f(x).block_until_ready()
    rows = top_host_events(glob.glob(f"{tmp_path}/**/perfetto_trace.json.gz", recursive=True)[0], 3)
    assert rows and all(n > 0 and ms >= 0 for _, _, n, ms in rows)
    assert any("PjitFunction" in name for _, name, _, _ in rows)


def test_startup_benchmark_reads_phases_even_from_a_stopped_run():
    """benchmarks/startup.py reads each child's phase lines as they come, so a run stopped by
    its timeout still reports the phases it reached (a cold GPU start-up can outlast a call)."""
    import sys

    from benchmarks import startup

    done = ("print('STEP 1/2 3.0', flush=True); print('PHASE compile 4.5 9.0', flush=True); "
            "print('DONE {\"process_s\": 12.0, \"variants\": 2}', flush=True)")
    out, last = startup.run_child([sys.executable, "-c", done], timeout=60)
    assert out == {"compile": 4.5, "process_s": 12.0, "variants": 2, "steps": ["1/2 3.0"]}
    assert last == "1/2 3.0"
    stuck = ("import time; print('PHASE probe 7.0 8.0', flush=True); "
             "print('STEP 3/16 20.5', flush=True); time.sleep(60)")
    out, last = startup.run_child([sys.executable, "-c", stuck], timeout=3)
    assert out == {"probe": 7.0, "steps": ["3/16 20.5"]} and last == "3/16 20.5"


def test_every_benchmark_script_compiles():
    """Benchmarks run on the GPU machine only, where a script that does not even compile costs a
    call: session 12's quant_matmul.py declared ``global`` after using the names (a SyntaxError
    that session 13's call found). Every script under benchmarks/ must at least compile."""
    root = Path(__file__).resolve().parents[2] / "benchmarks"
    scripts = sorted(root.glob("*.py"))
    assert len(scripts) > 20
    for path in scripts:
        compile(path.read_text(encoding="utf-8"), str(path), "exec")


def test_every_module_patch_names_a_switch_it_changes():
    """step_floor's --ab module patches (also kv_dtype_step's KV+PATCH entries): each names an
    existing module constant, sets a value other than the engine's default while compiling, and
    puts the default back."""
    import importlib

    for name, (path, attr, value) in step_floor.MODULE_PATCHES.items():
        module = importlib.import_module(path)
        default = getattr(module, attr)
        assert default != value, name
        with step_floor.patched(name):
            assert getattr(module, attr) == value, name
        assert getattr(module, attr) == default, name


def test_patched_engines_keep_their_programs_apart(monkeypatch, tmp_path):
    """An engine built under an A/B patch (kv_dtype_step's KV+PATCH entries) compiles into a
    cache folder of its own: the stored step executables are keyed by configuration and source,
    not by the module constants a patch sets (session 43: the fp8+rope-write-quant-on arm ran
    the fp8 arm's program). Unpatched entries keep the default folder."""
    from benchmarks import kv_dtype_step

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    a, b = step_floor.ab_cache_dir("fp8+rope-write-quant-on"), step_floor.ab_cache_dir("fp8+a/b")
    assert a != b and all(p.startswith(str(tmp_path / "jserve" / "xla" / "ab")) for p in (a, b))
    seen = []
    monkeypatch.setattr(kv_dtype_step, "one",
                        lambda *a, mixed, max_num_seqs: seen.append((a[-1], mixed, max_num_seqs))
                        or (10, 1.0, 1.0, 16))
    monkeypatch.setattr("sys.argv", ["kv_dtype_step", "--kv-dtypes", "auto,fp8+rope-write-quant-on",
                                     "--mixed", "4096", "--max-num-seqs", "256"])
    kv_dtype_step.main()
    assert seen == [(None, 4096, 256), (a, 4096, 256)]


def test_offline_attention_counts_programs_per_sm():
    """offline_attention.py's occupancy arithmetic (Hopper: 64K registers allocated per warp in
    256s, 228 KB of shared memory with 1 KB reserved per program, 2048 threads), on session 47's
    compiled decode launches and on each limit alone."""
    from benchmarks.offline_attention import programs_per_sm

    assert programs_per_sm(168, 38912, 128) == 3    # fp8 pool, 64 keys: registers bind
    assert programs_per_sm(255, 73856, 128) == 2    # fp8 pool, 128 keys
    assert programs_per_sm(128, 55296, 128) == 4    # bf16 pool, 64 keys: registers and SMEM
    assert programs_per_sm(32, 100_000, 128) == 2   # shared memory binds
    assert programs_per_sm(16, 0, 1024) == 2        # threads bind
    assert programs_per_sm(161, 0, 128) == 3        # 161 registers allocate as 168


def test_cta_timeline_reads_the_on_device_profile():
    """cta_timeline.py reads Mosaic GPU's per-CTA trace (each event's ts = (the CTA's global-timer
    start in ns + SM cycles after it) / 1e3, its pid 1 + the SM): two CTAs on SM 0 at 1000 MHz,
    the second starting 1 us later, first tiles after 2 and 3 us, steps 1 us apart, ends 6 us
    and 9 us after the first start; a third alone on SM 4, its trace led by the profiler's own
    "Init" scope."""
    from benchmarks import cta_timeline

    def cta(tid, start_ns, events, sm=0):
        return [{"name": n, "ph": ph, "ts": (start_ns + cycles) / 1e3, "pid": 1 + sm, "tid": tid}
                for n, ph, cycles in events]

    first = cta(1, 5e6, [("start", "B", 0), ("start", "E", 10), ("step", "B", 2000), ("step", "E", 2500),
                         ("step", "B", 3000), ("step", "E", 3500), ("store", "B", 3600), ("store", "E", 3700),
                         ("exit", "B", 5000), ("exit", "E", 6000)])
    second = cta(2, 5e6 + 1000, [("start", "B", 0), ("start", "E", 10), ("step", "B", 3000),
                                 ("step", "E", 3300), ("step", "B", 4000), ("step", "E", 4300),
                                 ("exit", "B", 7000), ("exit", "E", 8000)])
    third = cta(3, 5e6, [("Init", "B", 0), ("Init", "E", 50), ("start", "B", 100), ("start", "E", 110),
                         ("step", "B", 1000), ("step", "E", 1500), ("exit", "B", 4000), ("exit", "E", 4500)],
                sm=4)
    events = cta_timeline.cta_events({"traceEvents": first + second + third})
    assert events[2][0] == 5e6 + 1000 and events[2][1][2] == ("step", "B", 3000) and events[2][2] == 0
    assert events[3][2] == 4
    groups = cta_timeline.by_sm(events, mhz=1000.0)
    assert groups["alone on its SM"] == pytest.approx((1, 1.0, 4.5, 4.5))
    assert groups["sharing its SM, started first"] == pytest.approx((1, 2.0, 6.0, 6.0))
    assert groups["sharing its SM, started later"] == pytest.approx((1, 3.0, 9.0, 9.0))
    assert groups["latest quarter by first tile"] == pytest.approx((1, 3.0, 9.0, 9.0))
    assert groups["the first 2 CTA ids (one per SM)"] == pytest.approx((2, 2.5, 7.5, 9.0))
    assert groups["the later CTA ids"] == pytest.approx((1, 1.0, 4.5, 4.5))
    del events[3]
    got = cta_timeline.summary(events, mhz=1000.0, step_bytes=16384)
    assert got["CTAs"] == 2
    assert got["kernel us (first start to last end)"] == pytest.approx(9.0)
    assert got["start spread us"] == pytest.approx(1.0)
    assert got["first tiles us (median / max)"] == pytest.approx((2.5, 3.0))
    assert got["step interval us (median)"] == pytest.approx(1.0)
    assert got["body us per step (median)"] == pytest.approx(0.4)
    assert got["store us (median)"] == pytest.approx(0.1)
    assert got["steady weight GB/s (all CTAs at the median interval)"] == pytest.approx(2 * 16384 / 1e3)
    assert got["end spread us (first to last CTA)"] == pytest.approx(3.0)


def test_ring_cost_direct_want_xors_each_ctas_tiles():
    """ring_cost.direct_want: CTA c's [64, 256] tiles (K-major within each 64-row tile, a
    balanced share each, the last CTA short) xor-ed together."""
    w = np.random.default_rng(0).integers(-127, 128, (128, 1024), dtype=np.int8)
    tiles = [w[g // 4 * 64:g // 4 * 64 + 64, g % 4 * 256:g % 4 * 256 + 256] for g in range(8)]
    got = np.asarray(direct_want(jnp.asarray(w), 3))
    assert np.array_equal(got[:64], tiles[0] ^ tiles[1] ^ tiles[2])
    assert np.array_equal(got[128:], tiles[6] ^ tiles[7])


def test_decode_stream_sweep_reads_every_ctas_units_in_turn():
    """decode_stream.stream, interpreted: with ``sweep`` CTA c's units are c, c + ctas, ...
    (its last tile: the largest such unit), without it a balanced contiguous share."""
    w = np.random.default_rng(0).integers(-127, 128, (128, 1024), dtype=np.int8)
    tiles = [w[g // 4 * 64:g // 4 * 64 + 64, g % 4 * 256:g % 4 * 256 + 256] for g in range(8)]
    for sweep, last in ((True, [6, 7, 5]), (False, [2, 5, 7])):
        got = np.asarray(stream(jnp.asarray(w), jnp.zeros((3,), jnp.int32), bn=64, bk=256, stages=2,
                                ctas=3, sweep=sweep, interpret=True))
        for c, g in enumerate(last):
            assert np.array_equal(got[64 * c:64 * c + 64], tiles[g]), (sweep, c)
