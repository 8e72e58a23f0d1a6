"""gpu_memory_utilization: JAX's allocator share set before the backend starts, the usable
bytes where JAX started first, and the measured activation peak (jserve/device_memory.py,
jserve/activation_peak.py)."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jserve import activation_peak
from jserve.activation_peak import (
    compiled_extra_bytes,
    estimate_activation_bytes,
    measure_activation_bytes,
    split_peak_bytes,
)
from jserve.builder import memory_after_warmup
from jserve.device_memory import (
    FRACTION_VARS,
    allocator_fraction,
    allocator_report,
    allowed_bytes,
    usable_device_bytes,
)
from jserve.kv_cache import MemoryBudget
from jserve.startup_cache import FILE_NAME, StartupCache

ROOT = Path(__file__).resolve().parents[2]
GIB = 2**30


def test_usable_bytes_are_the_share_of_the_device_capped_by_the_allocator():
    # Allocator made with the engine's share: all of its limit.
    assert allowed_bytes(int(90 * GIB * 0.9), 0.9, 0.9) == (int(90 * GIB * 0.9), None)
    # A larger share (the user's XLA_CLIENT_MEM_FRACTION): only gpu_memory_utilization of the device.
    assert allowed_bytes(int(100 * GIB * 0.95), 0.95, 0.9) == (int(100 * GIB * 0.9), None)
    # JAX started first with its default 0.75 (a notebook): what the allocator allows, and why.
    usable, warning = allowed_bytes(75 * GIB, 0.75, 0.9)
    assert usable == 75 * GIB
    assert "gpu_memory_utilization=0.9" in warning and "share of 0.75" in warning
    assert "XLA_CLIENT_MEM_FRACTION=0.9" in warning


def test_allocator_fraction_per_platform(monkeypatch):
    for name in FRACTION_VARS:
        monkeypatch.delenv(name, raising=False)
    assert allocator_fraction("tpu") == allocator_fraction("cpu") == 1.0
    assert allocator_fraction("gpu") == 0.75            # JAX's default share
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.6")
    assert allocator_fraction("gpu") == 0.6


def _fresh(code: str, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in FRACTION_VARS}
    clean.update(PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", **env)
    return subprocess.run([sys.executable, "-c", code], env=clean, capture_output=True, text=True,
                          check=True, timeout=120).stdout.strip()


def test_share_is_set_before_the_backend_starts_and_never_overrides():
    set_first = ("import os, jax; from jserve.device_memory import allow_device_memory; "
                 "allow_device_memory(0.85); print(os.environ.get('XLA_CLIENT_MEM_FRACTION'))")
    assert _fresh(set_first) == "0.85"
    # The user's own share stays (the budget warns if it is smaller).
    assert _fresh(set_first, XLA_PYTHON_CLIENT_MEM_FRACTION="0.5") == "None"
    # JAX already started (a notebook): too late to change; nothing is set.
    started = ("import os, jax; jax.devices(); from jserve.device_memory import allow_device_memory; "
               "allow_device_memory(0.85); print(os.environ.get('XLA_CLIENT_MEM_FRACTION'))")
    assert _fresh(started) == "None"


def test_the_probe_measures_the_largest_step_the_engine_compiles(make_engine, tmp_path, monkeypatch):
    """The 2-page probe's figure is the real (100-page) largest steps': the pool is donated and
    updated in place, so the activation peak does not grow with it. The largest bucket's steps
    and, where no split step stands for it (CPU), the largest decode bucket's plain sampler.
    The figure is kept beside the compilation cache: a restart of the same engine reads it back
    without building the probe, any other engine measures its own."""
    engine = make_engine("llama", max_num_batched_tokens=64, max_num_seqs=8, num_pages=100)
    r = engine.runner
    plain = max((v for v in r._compiled if v.plain), key=lambda v: v.tokens)
    real = max(compiled_extra_bytes(c) for v, c in r._compiled.items() if v.tokens == 64 or v == plain)
    gather, scatter = (low.compile() for low in r.mover.lower_largest_moves(r.kv))  # swap is on
    upload = gather.memory_analysis().output_size_in_bytes   # the pages brought back to the device
    move = compiled_extra_bytes(gather) + upload + compiled_extra_bytes(scatter)
    assert move > compiled_extra_bytes(gather) > 0 and upload > 0 and real > 0
    cache = StartupCache(str(tmp_path))
    import jax

    live = {id(a) for a in jax.live_arrays()}
    assert measure_activation_bytes(engine.config, r.params, r.mesh, cache=cache) == real + move
    assert (tmp_path / FILE_NAME).exists()
    # The probe runner's state is freed when the probe returns, not at some later collection
    # (freed after the engine's own state, it left a hole no pool array fits: session 51).
    assert [a.shape for a in jax.live_arrays() if id(a) not in live] == []

    def no_probe(*a, **k):
        raise AssertionError("the probe ran")

    monkeypatch.setattr(activation_peak, "Runner", no_probe)
    assert measure_activation_bytes(engine.config, r.params, r.mesh, cache=cache) == real + move
    other = dataclasses.replace(engine.config, scheduler=dataclasses.replace(
        engine.config.scheduler, max_num_batched_tokens=32))
    with pytest.raises(AssertionError, match="the probe ran"):
        measure_activation_bytes(other, r.params, r.mesh, cache=cache)
    with pytest.raises(AssertionError, match="the probe ran"):   # no cache folder: nothing kept
        measure_activation_bytes(engine.config, r.params, r.mesh, cache=StartupCache(None))
    monkeypatch.undo()
    # The split step (counted where it is compiled: GPU/TPU) keeps its logits for the sampler.
    logits = r.layout(16).num_rows * engine.config.model.vocab_size * 4
    assert split_peak_bytes(*(low.compile() for low in r.lower_split(16))) >= logits
    # The planner's shape estimate (GPU/TPU kernels read pages in place; CPU's reference
    # attention gathers each sequence's pages, so CPU measures more) is positive and grows
    # with the token budget.
    assert 0 < estimate_activation_bytes(engine.config)
    c = engine.config
    bigger = dataclasses.replace(c, scheduler=dataclasses.replace(c.scheduler, max_num_batched_tokens=128))
    assert estimate_activation_bytes(bigger) > estimate_activation_bytes(c)


def test_the_probe_measures_the_speculative_step_of_a_draft_model(make_engine):
    """The same with a draft model, whose step writes the draft's pool once for the rows and
    again in each of its K decodes: a 100-page engine's speculative step needs what the 2-page
    probe measured. Without an order between the rows' attention reads and the decodes' writes,
    XLA copied a layer's pool arrays (a pool-sized temporary the probe cannot see: the 0.9-share
    start-up of code-small + code-draft ran out of memory on an H200, session 13)."""
    from fixture_paths import GOLDEN

    draft = {"method": "draft_model", "model": str(GOLDEN / "llama"), "num_speculative_tokens": 3,
             "disable_by_batch_size": None}
    engine = make_engine("llama", max_num_batched_tokens=64, max_num_seqs=8, num_pages=100,
                         speculative_config=draft)
    r = engine.runner
    real = compiled_extra_bytes(r.spec_steps._compiled[(64, False)])
    move = 0
    for mover, kv in ((r.mover, r.kv), (r.spec_steps.mover, r.spec_steps.draft.kv)):
        gather, scatter = (low.compile() for low in mover.lower_largest_moves(kv))
        move += (compiled_extra_bytes(gather) + gather.memory_analysis().output_size_in_bytes
                 + compiled_extra_bytes(scatter))
    assert real > 0 and move > 0
    assert measure_activation_bytes(engine.config, r.params, r.mesh, r.spec_steps.draft) == real + move


def test_the_probe_measures_the_speculative_step_of_ngram_lookup(make_engine):
    """With n-gram drafts every step runs the speculative variant, which records tokens into
    the slot histories and looks up drafts: a 100-page engine's step needs what the 2-page
    probe measured (the history is runner state, counted apart by ``spec_state_bytes``)."""
    ngram = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1,
             "prompt_lookup_max": 3, "disable_by_batch_size": None}
    engine = make_engine("llama", max_num_batched_tokens=64, max_num_seqs=8, num_pages=100,
                         speculative_config=ngram)
    r = engine.runner
    real = compiled_extra_bytes(r.spec_steps._compiled[(64, False)])
    gather, scatter = (low.compile() for low in r.mover.lower_largest_moves(r.kv))
    move = (compiled_extra_bytes(gather) + gather.memory_analysis().output_size_in_bytes
            + compiled_extra_bytes(scatter))
    assert real > 0 and move > 0
    assert measure_activation_bytes(engine.config, r.params, r.mesh) == real + move


class _StartedGpu:
    """A GPU whose allocator JAX created before the engine, with its default share (0.75)."""

    platform = "gpu"

    def memory_stats(self) -> dict[str, int]:
        return {"bytes_limit": 75 * GIB, "bytes_in_use": 0}


def test_a_started_allocator_is_used_as_it_is_with_a_warning(monkeypatch, caplog):
    for name in FRACTION_VARS:
        monkeypatch.delenv(name, raising=False)
    with caplog.at_level("WARNING", logger="jserve.device_memory"):
        assert usable_device_bytes(_StartedGpu(), 0.9) == 75 * GIB
    assert "build the engine before any other JAX call" in caplog.text
    caplog.clear()
    assert usable_device_bytes(_StartedGpu(), 0.6) == 60 * GIB   # less than allowed: no warning
    assert not caplog.text


def test_warmup_memory_line_reports_the_peak_against_the_usable_bytes():
    class Device:
        def memory_stats(self) -> dict:
            return {"bytes_in_use": 3 * 2**30, "peak_bytes_in_use": 4 * 2**30 - 2**20}
    line = memory_after_warmup(Device(), MemoryBudget(4 * 2**30, 2**30, 0, 2**29))
    assert "3.00 GiB in use, peak 4.00 GiB of 4.00 GiB usable (1.0 MiB never touched)" in line


def test_the_allocator_report_splits_the_bytes_in_use_into_live_arrays_and_the_rest():
    """The retry's warning (a pool array without a free block after compiling) says how much of
    the device no array holds; a backend without statistics (CPU) gives nothing to report."""
    import jax
    import jax.numpy as jnp

    cpu = jax.devices("cpu")[0]
    assert allocator_report(cpu) == ""

    class Device:   # the CPU device, reporting a GPU allocator's statistics
        def memory_stats(self) -> dict:
            return {"bytes_limit": 8 * GIB, "bytes_in_use": 3 * GIB, "num_allocs": 7,
                    "largest_free_block_bytes": GIB // 2}

        def __eq__(self, other: object) -> bool:
            return other == cpu

        __hash__ = object.__hash__

    held = jax.device_put(jnp.zeros((GIB // 4 // 4,), jnp.float32), cpu).block_until_ready()
    report = allocator_report(Device())
    live = float(report.split("(")[1].split(" GiB")[0])
    assert report.startswith("3.00 GiB in use (") and 0.25 <= live < 3, report
    assert "largest free block 0.50 GiB, 7 allocations, limit 8.00 GiB" in report
    del held


def test_startup_cache_survives_a_damaged_file(tmp_path):
    cache = StartupCache(str(tmp_path))
    assert cache.get("fp", "activation_bytes") is None
    (tmp_path / FILE_NAME).write_text("{not json")
    assert cache.get("fp", "activation_bytes") is None   # measured again, then rewritten
    cache.put("fp", "activation_bytes", 123)
    cache.put("other", "activation_bytes", 7)
    assert cache.get("fp", "activation_bytes") == 123 and cache.get("other", "activation_bytes") == 7
    assert not list(tmp_path.glob("*.tmp"))


def test_startup_fingerprint_follows_what_the_programs_depend_on(monkeypatch):
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh

    from jserve.startup_cache import engine_fingerprint

    mesh = Mesh(jax.devices()[:1], ("tensor",))
    params = {"w": jnp.zeros((4, 8), jnp.bfloat16)}
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    base = engine_fingerprint("config-a", params, mesh)
    assert engine_fingerprint("config-a", params, mesh) == base
    assert engine_fingerprint("config-b", params, mesh) != base
    assert engine_fingerprint("config-a", {"w": jnp.zeros((4, 8), jnp.float32)}, mesh) != base
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_autotune_level=1")
    assert engine_fingerprint("config-a", params, mesh) != base


def test_the_probe_compiles_the_burst_programs(make_engine, monkeypatch):
    """Bursts (``num_scheduler_steps``) run the smallest bucket's decode step N times in one
    program: the probe compiles them beside the largest bucket's steps (they can keep more
    alive: their fori_loop form did on an H200, session 16)."""
    engine = make_engine("llama", max_num_batched_tokens=64, max_num_seqs=8, num_pages=100,
                         num_scheduler_steps=4)
    r = engine.runner
    bursts = {v for v in r._compiled if v.burst > 1}
    assert len(bursts) == 2 and all(v.tokens == 16 for v in bursts)
    lowered = []
    plain = activation_peak.Runner.lower_step

    def record(self, variant):
        lowered.append(variant)
        return plain(self, variant)

    monkeypatch.setattr(activation_peak.Runner, "lower_step", record)
    peak = measure_activation_bytes(engine.config, r.params, r.mesh)
    assert bursts <= set(lowered)
    assert peak >= max(compiled_extra_bytes(r._compiled[v]) for v in bursts)


def test_an_out_of_memory_warmup_names_the_program_and_its_measured_sizes():
    """A step that runs out of memory in the warm-up is reported with what its compile measured
    and the allocator's use, and the two levers; an executable without an analysis still gets
    the message."""
    import jax
    import jax.numpy as jnp

    from jserve.compile_pool import out_of_memory_named, out_of_memory_note

    class Device:
        def memory_stats(self):
            return {"bytes_in_use": 3 * 2**30, "bytes_limit": 4 * 2**30}

    compiled = jax.jit(lambda x: x @ x).lower(jnp.ones((512, 512), jnp.float32)).compile()
    note = out_of_memory_note("step variant v", compiled, Device())
    assert note.startswith("step variant v ran out of device memory")
    assert "1.0 MiB of outputs" in note and "3.00 GiB of 4.00 GiB" in note
    assert "gpu_memory_utilization" in note and "activation_memory_bytes" in note
    assert "not available" in out_of_memory_note("step variant v", object(), Device())
    with pytest.raises(MemoryError, match="step variant v ran out of device memory"):
        with out_of_memory_named("step variant v", compiled, Device()):
            raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate")
    with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):
        with out_of_memory_named("step variant v", compiled, Device()):
            raise jax.errors.JaxRuntimeError("INTERNAL: something else")


def test_the_warmup_debug_line_counts_pool_arrays_a_step_did_not_update_in_place():
    import jax
    import jax.numpy as jnp

    from jserve.compile_pool import buffer_addresses, warm_memory_line

    pool = [(jnp.zeros((4, 8)), jnp.zeros((4, 8)))]
    before = buffer_addresses(pool)
    step = jax.jit(lambda kv: [(k + 1, v) for k, v in kv], donate_argnums=0)
    after = step(pool)
    line = warm_memory_line(before, after, jax.devices()[0])
    assert line.startswith("0 of 2 pool buffers moved")      # donated: updated in place
    assert warm_memory_line(before, [(jnp.ones((4, 8)), jnp.ones((4, 8)))], object()).startswith(
        "2 of 2 pool buffers moved; device in use 0.00 GiB")
    assert warm_memory_line(None, after, object()) == (
        "device in use 0.00 GiB, peak 0.00, largest free block 0.00")   # the line before the first step


def test_the_pool_hold_is_released_only_after_every_pool_array_exists(monkeypatch):
    """The pool's allocations run asynchronously; the hold that keeps the step programs' room
    must outlive them (H200, session 21: released at dispatch, the 8B's last pool array at a
    0.9 share found no block left and the first warm-up step ran out of memory)."""
    import jax
    from quant_fixtures import tiny_config

    from jserve import kv_cache
    from jserve.config import ModelConfig
    from sharding import make_mesh

    events = []

    class Hold:
        def delete(self) -> None:
            events.append("hold released")

    real = jax.block_until_ready

    def waited(tree):
        events.append(f"waited for {len(jax.tree.leaves(tree))} arrays")
        return real(tree)

    monkeypatch.setattr(kv_cache, "_placeholders", lambda mesh, nbytes: [Hold()])
    monkeypatch.setattr(jax, "block_until_ready", waited)
    cfg = ModelConfig.from_hf_config(tiny_config(), dtype="float32")
    kv_cache.allocate_kv_cache(cfg, 4, 16, "float32", make_mesh(1), keep_free_bytes=1 << 20)
    assert events == ["waited for 2 arrays"] * cfg.num_layers + ["hold released"]   # layer by layer


def _fail_once_at(monkeypatch, n: int) -> None:
    """The pool's n-th array (1-based, counted over allocations) fails once as the allocator
    fails when no free block fits it."""
    import jax

    from jserve import kv_cache

    real, calls = kv_cache._filler, []

    def filler(like, value):
        fill = real(like, value)

        def maybe_fail():
            calls.append(1)
            if len(calls) == n:
                raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to "
                                                 "allocate (test)")
            return fill()
        return maybe_fail

    monkeypatch.setattr(kv_cache, "_filler", filler)


def test_a_pool_array_without_a_free_block_leaves_nothing_allocated(monkeypatch):
    import jax
    from quant_fixtures import tiny_config

    from jserve import kv_cache
    from jserve.config import ModelConfig
    from sharding import make_mesh

    cfg = ModelConfig.from_hf_config(tiny_config(layers=4), dtype="float32")
    made, real = [], kv_cache._filler

    def recording(like, value):   # every array the pool creates, kept to check it was freed
        fill = real(like, value)

        def make():
            made.append(fill())
            return made[-1]
        return make

    monkeypatch.setattr(kv_cache, "_filler", recording)
    _fail_once_at(monkeypatch, 6)   # layer 2's V pages
    with pytest.raises(kv_cache.PoolDoesNotFit, match="4 of 8 found a free block") as e:
        kv_cache.allocate_kv_cache(cfg, 40, 16, "float32", make_mesh(1))
    assert len(made) == 5 and all(a.is_deleted() for a in made)
    assert e.value.array_bytes == 40 * 16 * cfg.num_kv_heads * cfg.head_dim * 4
    assert e.value.pages_that_fit(40) == 15   # 3 of the 8 arrays' worth of pages: 4 fitted, less one
    assert len(jax.tree.leaves(kv_cache.allocate_kv_cache(cfg, 15, 16, "float32", make_mesh(1)))) == 8


def _counting_compiles(monkeypatch) -> list[int]:
    """One entry per ``Runner.compile_programs`` call (each compiles the step programs)."""
    from jserve.runner import Runner

    calls, real = [], Runner.compile_programs

    def counted(self, *a, **k):
        calls.append(1)
        return real(self, *a, **k)

    monkeypatch.setattr(Runner, "compile_programs", counted)
    return calls


def _room_for(monkeypatch, pages: int) -> list[int]:
    """The allocator as a fragmented one looks to a pool: every array of a pool of more than
    ``pages`` pages finds no free block. -> the page counts of the pools tried (one entry per
    allocation attempt)."""
    import jax

    from jserve import kv_cache

    real, tried = kv_cache._filler, []

    def filler(like, value):
        fill = real(like, value)

        def maybe_fail():
            if like.shape[0] > pages:
                raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to "
                                                 "allocate (test)")
            return fill()
        return maybe_fail

    def allocate(cfg, num_pages, *a, **k):
        tried.append(num_pages)
        return real_allocate(cfg, num_pages, *a, **k)

    real_allocate = kv_cache.allocate_kv_cache
    monkeypatch.setattr(kv_cache, "_filler", filler)
    from jserve import pool_fit
    monkeypatch.setattr(pool_fit, "allocate_kv_cache", allocate)
    return tried


def test_a_fragmented_pool_is_found_before_the_step_programs_compile(make_engine, monkeypatch, caplog):
    """Where the allocator reports a limit, start-up allocates the pool once (beside the
    runner's state) and frees it before compiling: 80 pages find no block, trial allocations
    find the most that do (50), and the programs compile once, for those."""
    from engine_helpers import run_tokens

    from jserve import builder
    from jserve.sampling_params import SamplingParams

    monkeypatch.setattr(builder, "allocator_limited", lambda device: True)
    compiles = _counting_compiles(monkeypatch)
    tried = _room_for(monkeypatch, 50)
    with caplog.at_level("WARNING", logger="jserve.builder"):
        engine = make_engine("llama", num_pages=80, max_num_batched_tokens=16, max_num_seqs=4)
    assert "planning 50 pages instead of 80 (37.5% fewer) before the step programs compile" in caplog.text
    assert "compiling the step programs again" not in caplog.text and len(compiles) == 1
    assert tried[0] == 80 and tried[-1] == 50 and len(tried) <= 8   # the trials, then the pool
    assert engine.runner.kv[0][0].shape[0] == 50 and engine.scheduler.kv.pool.num_pages == 50
    assert run_tokens(engine, [[1, 2, 3]], SamplingParams(max_tokens=4, temperature=0))[0]


def test_start_up_retries_a_fragmented_pool_with_fewer_pages_and_compiles_for_them(make_engine, monkeypatch,
                                                                                   caplog):
    """The one recovery that compiles an engine twice (holes the compile itself left; on CPU
    there is no trial allocation before it): 80 pages find no block, trial allocations find
    the most that do (50), and the engine starts over one fewer (room for the second compile's
    own holes), compiled for them, and serves."""
    from engine_helpers import run_tokens

    from jserve.sampling_params import SamplingParams

    compiles = _counting_compiles(monkeypatch)
    _room_for(monkeypatch, 50)
    with caplog.at_level("WARNING", logger="jserve.builder"):
        engine = make_engine("llama", num_pages=80, max_num_batched_tokens=16, max_num_seqs=4)
    assert "allocating 49 pages instead of 80" in caplog.text and len(compiles) == 2
    assert engine.runner.kv[0][0].shape[0] == 49 and engine.scheduler.kv.pool.num_pages == 49
    assert run_tokens(engine, [[1, 2, 3]], SamplingParams(max_tokens=4, temperature=0))[0]


def test_start_up_shrinks_the_pool_when_the_compiled_programs_outgrow_the_activations_held(
        make_engine, monkeypatch, caplog):
    """A temporary that grows with the pool escapes the probe's 2-page pool (session 22: fp8
    pool writes through XLA's f16 scatter): when the compiled programs' peak passes the
    activations held, the excess comes out of the pool, compiled again for it, instead of a
    warm-up out of memory. Here the budget holds no activations at all."""
    from engine_helpers import run_tokens

    from jserve import builder
    from jserve.sampling_params import SamplingParams

    def budget(config, weight_bytes, device, activations):
        return MemoryBudget(weight_bytes + 64 * 2**20, weight_bytes, 0, 0)

    monkeypatch.setattr(builder, "memory_budget", budget)
    with caplog.at_level("WARNING", logger="jserve.builder"):
        engine = make_engine("llama", num_pages=None, max_num_batched_tokens=16, max_num_seqs=4)
    import re

    runner, pages = engine.runner, engine.scheduler.kv.pool.num_pages
    (to, first), = re.findall(r"activation peak passes the activations held by [0-9.]+ MiB: "
                              r"allocating (\d+) pages instead of (\d+)", caplog.text)
    dropped = -(-runner.steps_peak // builder.pool_page_bytes(engine.config)) + 1
    assert int(first) - int(to) == dropped and pages == int(to) and runner.kv[0][0].shape[0] == pages
    assert run_tokens(engine, [[1, 2, 3]], SamplingParams(max_tokens=4, temperature=0))[0]
