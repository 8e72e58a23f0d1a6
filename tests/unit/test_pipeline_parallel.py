"""Pipeline parallelism: the micro-batch split of a ragged step, the gpipe schedule and the
interleaved one of bursts (gpipe_cycle), and pp=2 / tp=2 x pp=2 engines (bursts included) giving
the same greedy and seeded sampled tokens as pp=1/tp=1 (float32).

The engines run in a subprocess with 4 forced host devices (this session has 2): one ref, one
pp=2 and one tp=2 x pp=2 engine per model, small buckets to keep the compile count low."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fixture_paths import ARCHS, GOLDEN

from jserve.builder import default_model_path
from jserve.model.microbatch import bubble, split_microbatches
from jserve.step_input import StepInput
from sharding import gpipe, gpipe_cycle, make_mesh

ROOT = Path(__file__).resolve().parents[2]
PAGE = 4


def _step(chunks: list[tuple[int, int]], t: int, r: int) -> StepInput:
    """chunks: (start, num_tokens) per row, packed back to back; request i on pages from 1+8i."""
    b = StepInput.empty(t, r, 8)
    pos0 = 0
    for i, (start, n) in enumerate(chunks):
        pos = np.arange(start, start + n, dtype=np.int32)
        pages = 1 + 8 * i + np.arange(8, dtype=np.int32)
        b.token_ids[pos0:pos0 + n] = 100 + i
        b.positions[pos0:pos0 + n] = pos
        b.slot_mapping[pos0:pos0 + n] = pages[pos // PAGE] * PAGE + pos % PAGE
        b.page_table[i] = pages
        b.seq_lens[i] = start + n
        b.query_start_loc[i + 1:] = pos0 + n
        b.logits_indices[i] = pos0 + n - 1
        pos0 += n
    b.num_seqs[0] = len(chunks)
    return b


def test_split_cuts_a_chunk_like_chunked_prefill():
    # rows: a = 10 tokens from 5 (straddles the cut at 8), b = 1 decode token, c = 3 tokens
    b = _step([(5, 10), (20, 1), (0, 3)], 16, 8)
    mb = jax.tree.map(np.asarray, split_microbatches(jax.tree.map(jnp.asarray, b), 2))
    assert mb.token_ids.shape == (2, 8) and mb.page_table.shape == (2, 8, 8)
    np.testing.assert_array_equal(mb.token_ids.reshape(-1), b.token_ids)
    np.testing.assert_array_equal(mb.slot_mapping.reshape(-1), b.slot_mapping)
    # mb 0: a0..a7 only; its context so far is 5 cached + 8 = 13
    assert mb.num_seqs[0, 0] == 1
    np.testing.assert_array_equal(mb.query_start_loc[0, :3], [0, 8, 8])
    np.testing.assert_array_equal(mb.seq_lens[0, :2], [13, 0])
    np.testing.assert_array_equal(mb.page_table[0, 0], b.page_table[0])
    # mb 1: a8 a9 | b | c0..c2, then padding
    assert mb.num_seqs[1, 0] == 3
    np.testing.assert_array_equal(mb.query_start_loc[1, :5], [0, 2, 3, 6, 6])
    np.testing.assert_array_equal(mb.seq_lens[1, :4], [15, 21, 3, 0])
    np.testing.assert_array_equal(mb.page_table[1, :3], b.page_table[:3])


def test_split_of_padding_only_window_has_no_rows():
    b = _step([(0, 3), (7, 1)], 16, 8)
    mb = jax.tree.map(np.asarray, split_microbatches(jax.tree.map(jnp.asarray, b), 4))
    np.testing.assert_array_equal(mb.num_seqs[:, 0], [2, 0, 0, 0])
    np.testing.assert_array_equal(mb.seq_lens[0, :3], [3, 8, 0])
    assert not mb.seq_lens[1:].any() and not mb.query_start_loc[1:].any()
    with pytest.raises(ValueError, match="micro-batches"):
        split_microbatches(b, 3)
    idle = bubble(jax.tree.map(jnp.asarray, b), jnp.asarray(False))
    assert not np.asarray(idle.slot_mapping).any() and int(idle.num_seqs[0]) == 0


@pytest.mark.skipif(len(jax.devices()) < 2, reason="needs 2 devices (XLA_FLAGS host count)")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gpipe_matches_sequential_stages(dtype):
    """Two stages of two 'layers' each (x -> x * w + state, state += x) over three micro-batches
    equal the same four layers run one after another; in bfloat16 too (XLA:CPU aborted on the
    bfloat16 all-reduce of the outputs)."""
    mesh = make_mesh(1, pipeline_parallel_size=2)
    w = jnp.arange(1.0, 5.0, dtype=dtype)                       # [L=4]
    xs = jnp.arange(12.0, dtype=dtype).reshape(3, 4) + 1        # [M=3, Tm=4]
    state = jnp.zeros((5, 2))                                   # [N, S]
    add = jnp.arange(3.0, dtype=dtype)                          # per micro-batch

    def stage_fn(w, state, x, a, valid):
        for i in range(w.shape[0]):
            x = x * w[i] + a
        state = state + jnp.where(valid, x.astype(jnp.float32).sum(), 0.0)
        return x, state

    run = jax.jit(lambda *a: gpipe(stage_fn, mesh, *a, state_axis=1))   # partial-manual: in jit
    ys, new_state = run(w, state, xs, add)
    want = xs
    for i in range(4):
        want = want * w[i] + add[:, None]
    assert ys.dtype == dtype
    np.testing.assert_array_equal(np.asarray(ys, np.float32), np.asarray(want, np.float32))
    # stage 1 saw the final outputs; stage 0 the outputs of layers 0-1
    half = (xs * w[0] + add[:, None]) * w[1] + add[:, None]
    np.testing.assert_allclose(new_state[:, 1], float(want.astype(jnp.float32).sum()))
    np.testing.assert_allclose(new_state[:, 0], float(half.astype(jnp.float32).sum()))


def test_gpipe_cycle_matches_groups_run_one_after_another():
    """Two stages (x -> x * w + 1 each; state += the stage's valid inputs) and two row groups
    circling for three steps, each step's output fed back as the next input (y mod 7; its int
    plus the count of earlier feeds, a feed state, the step's output), equal the groups' steps
    run one after another on one device."""
    mesh = make_mesh(1, pipeline_parallel_size=2)
    w = jnp.array([2.0, 3.0])                              # [L=2]: one layer per stage
    x0 = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])     # [G=2, Tg=3]
    state = jnp.zeros((1, 2))                              # [N, S]
    steps = 3

    def stage_fn(w, state, x, g, i, valid):
        state = state + jnp.where(valid, x.sum() * (g + 1) + i + 1, 0.0)
        return x * w[0] + 1.0, state

    def feed_fn(head, fed_sum, y, g, i, fed):   # out: y's ints plus the outputs fed before
        out = y.astype(jnp.int32) + fed_sum
        return jnp.mod(y, head), out, fed_sum + jnp.where(fed, 1, 0)

    run = jax.jit(lambda *a: gpipe_cycle(stage_fn, feed_fn, mesh, *a, steps=steps, state_axis=1))
    outs, new_state = run(w, state, jnp.float32(7.0), jnp.int32(0), x0)
    want, seen, fed = np.zeros((steps, 2, 3), np.int32), np.zeros(2), 0
    xs = [np.asarray(x0[g]) for g in range(2)]
    for i in range(steps):   # stage 0 feeds the groups' outputs in unit order: i, then g
        for g in range(2):
            x = xs[g]
            seen[0] += x.sum() * (g + 1) + i + 1
            h = x * 2.0 + 1.0
            seen[1] += h.sum() * (g + 1) + i + 1
            y = h * 3.0 + 1.0
            want[i, g] = y.astype(np.int32) + fed
            fed += 1
            xs[g] = np.mod(y, 7.0)
    np.testing.assert_array_equal(np.asarray(outs), want)
    np.testing.assert_allclose(np.asarray(new_state)[0], seen)


def test_pp2_and_tp2_pp2_match_pp1(xla_cache_dir):
    """Also with int8 weights and lm_head (the quantized matmul's per-shard call nested inside a
    stage's shard_map at tp2 x pp2; it crashed there before session 31)."""
    models = [str(default_model_path()), *(str(GOLDEN / a) for a in ARCHS),
              f"{GOLDEN / 'llama'}::int8+lm_head"]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    # Two workers at once, the models dealt between them: each engine's last program (the
    # pipelined burst, ~10 s) compiles alone on one core, which the other worker fills.
    procs = [subprocess.Popen([sys.executable, str(Path(__file__).with_name("pp_worker.py")),
                               xla_cache_dir, *models[i::2]], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        outs = [proc.communicate(timeout=1500) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    result = {}
    for proc, (out, err) in zip(procs, outs, strict=True):
        assert proc.returncode == 0, err[-4000:]
        result.update(json.loads(out.strip().splitlines()[-1]))
    for model in models:
        r = result[model]
        for name in ("pp2", "tp2_pp2"):
            e = r[name]
            assert e["tokens"] == r["ref"], (model, name)
            assert e["sampled"] == r["ref_sampled"], (model, name)
            # each device holds only its stage's layers: [N, S=2, ...] split over the stage axis
            assert e["kv_shape"][1] == 2 and e["kv_shard"][1] == 1, (model, name)
            assert e["kv_devices"] == (4 if name == "tp2_pp2" else 2), (model, name)
        assert r["pp2"]["kv_entries"] == r["tp2_pp2"]["kv_entries"] > 0
        assert r["pp2"]["bursts"] > 0 and r["tp2_pp2"]["bursts"] > 0, model
    first = result[models[0]]
    assert first["pp2"]["prompt_lps"] == first["ref_prompt_lps"]


def test_microbatch_count_per_bucket():
    from jserve.model.decoder import num_microbatches

    # Weight-bound steps (up to 2 x 256 tokens) run whole; larger ones cut into compute-bound
    # micro-batches of >= 256 tokens, at most 4S.
    assert [num_microbatches(t, 2) for t in (8, 64, 256, 512, 1024, 2048, 8192)] == [1, 1, 1, 2, 4, 8, 8]
    assert num_microbatches(2048, 2, fresh_prefill=True) == 1   # prompts are not cut for flash
    assert num_microbatches(6, 4) == 1 and num_microbatches(16, 4) == 1
    assert num_microbatches(4096, 4) == 16 and num_microbatches(1000, 2) == 2


@pytest.mark.skipif(len(jax.devices()) < 2, reason="needs 2 devices (XLA_FLAGS host count)")
def test_pp2_swap_moves_every_stages_pages(make_engine):
    """Preemption to the swap space under pp=2: a page moved to host and back carries the K/V of
    every stage (the pool's [N, S, ...] layout), so batched outputs equal one-at-a-time runs;
    serving compiles nothing (every pipelined variant was compiled at warm-up)."""
    from engine_helpers import CompileCounter, run_engine

    from jserve.sampling_params import SamplingParams

    engine = make_engine("llama", num_pages=13, enable_prefix_caching=False, pipeline_parallel_size=2)
    assert engine.runner.kv[0][0].shape[1] == 2
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    rng = np.random.default_rng(7)
    prompts = [rng.integers(5, 512, n).tolist() for n in (3, 9, 17, 24, 33, 40, 51, 60)]
    alone = [run_engine(engine, [(p, greedy)])[0].outputs[0].token_ids for p in prompts]
    before = engine.kv_cache_stats()
    with CompileCounter() as compiles:
        outs = run_engine(engine, [(p, greedy) for p in prompts])
    assert compiles.count == 0
    stats = engine.kv_cache_stats()
    assert stats["pages_swapped_in"] - before["pages_swapped_in"] > 0
    assert [o.outputs[0].token_ids for o in outs] == alone


def test_plan_sizes_the_pool_per_stage():
    """``jserve plan``: each device holds L/S layers' KV and weights, so per-token KV bytes halve
    at pp=2 and the pool holds more tokens per device."""
    from jserve.plan import plan_capacity

    one = plan_capacity("llama3.1-8b", gpu="H200")
    two = plan_capacity("llama3.1-8b", gpu="H200", pipeline_parallel_size=2)
    both = plan_capacity("llama3.1-8b", gpu="H200", pipeline_parallel_size=2, tensor_parallel_size=2)
    assert two.kv_bytes_per_token * 2 == one.kv_bytes_per_token
    assert both.kv_bytes_per_token * 4 == one.kv_bytes_per_token
    assert two.weight_bytes_per_device == one.weight_bytes_total // 2
    assert two.pool.num_tokens > 2 * one.pool.num_tokens
    text = two.render()
    assert "pp=2" in text and "16 layers (of 32: this stage of pp 2)" in text
    with pytest.raises(ValueError, match="pipeline_parallel_size"):
        plan_capacity("llama3.1-8b", gpu="H200", pipeline_parallel_size=3)


def test_config_refuses_what_pipelining_cannot_run():
    import dataclasses

    from jserve.config import EngineConfig, ModelConfig, ParallelConfig
    from jserve.spec.config import SpeculativeConfig

    cfg = ModelConfig(architecture="LlamaForCausalLM", vocab_size=64, hidden_size=64,
                      intermediate_size=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16)
    pp2 = ParallelConfig(pipeline_parallel_size=2)
    EngineConfig(model=cfg, parallel=pp2)
    with pytest.raises(ValueError, match=r"num_hidden_layers \(4\).*pipeline_parallel_size \(3\)"):
        EngineConfig(model=cfg, parallel=ParallelConfig(pipeline_parallel_size=3))
    windows = dataclasses.replace(cfg, sliding_windows=(8, 8, None, None))
    with pytest.raises(ValueError, match="sliding windows differ between stages"):
        EngineConfig(model=windows, parallel=pp2)
    EngineConfig(model=dataclasses.replace(cfg, sliding_windows=(8, None, 8, None)), parallel=pp2)
    with pytest.raises(ValueError, match="speculative_config"):
        EngineConfig(model=cfg, parallel=pp2, speculative=SpeculativeConfig(
            "ngram", 2, prompt_lookup_min=1, prompt_lookup_max=2))
    with pytest.raises(ValueError, match="pipeline_parallel_size"):
        ParallelConfig(pipeline_parallel_size=0)
    # flash prefill reads a prompt's own K/V, which a micro-batch cut would split: off under pp
    from jserve.builder import EngineArgs, make_engine_config

    sched = make_engine_config(EngineArgs(pipeline_parallel_size=2, flash_prefill_min_tokens=16),
                               cfg).scheduler
    assert not sched.flash_prefill(1024)
    assert make_engine_config(EngineArgs(flash_prefill_min_tokens=16), cfg).scheduler.flash_prefill(1024)
