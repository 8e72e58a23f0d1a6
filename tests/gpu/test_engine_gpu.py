"""The engine on a GPU: golden greedy tokens and bf16 serving (skipped without a GPU)."""

import functools

import jax
import numpy as np
import pytest
from engine_helpers import run_tokens
from fixture_paths import ARCHS, GOLDEN

from jserve.config import ModelConfig
from jserve.kv_cache import allocate_kv_cache
from jserve.model.decoder import forward
from jserve.model.params import random_params
from jserve.sampling_params import SamplingParams
from jserve.step_input import StepInput
from pallas_kernels.flash_attention import mgpu
from sharding import make_mesh

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("arch", ARCHS)
def test_golden_greedy_on_gpu(make_engine, arch):
    z = np.load(GOLDEN / arch / "reference.npz")
    prompts = [z["prompts"][i, :n].tolist() for i, n in enumerate(z["prompt_lens"])]
    engine = make_engine(arch)
    assert next(iter(engine.runner.kv[0][0].devices())).platform == "gpu"
    sp = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    for i, tokens in enumerate(run_tokens(engine, prompts, sp)):
        assert tokens == z[f"greedy_{i}"].tolist()


def test_bf16_engine_serves(make_engine):
    engine = make_engine("qwen2", dtype="bfloat16")
    sp = SamplingParams(temperature=0.8, top_p=0.9, seed=0, max_tokens=16, ignore_eos=True)
    (tokens,) = run_tokens(engine, [[3, 4, 5, 6]], sp)
    assert len(tokens) == 16


@pytest.mark.parametrize("arch", ARCHS)
def test_golden_greedy_with_flash_prefill_on_gpu(make_engine, arch):
    """Fresh-prompt steps through the Triton flash kernel inside the engine."""
    z = np.load(GOLDEN / arch / "reference.npz")
    prompts = [z["prompts"][i, :n].tolist() for i, n in enumerate(z["prompt_lens"])]
    engine = make_engine(arch, flash_prefill_min_tokens=16, enable_prefix_caching=False)
    sp = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    for i, tokens in enumerate(run_tokens(engine, prompts, sp)):
        assert tokens == z[f"greedy_{i}"].tolist()


def test_large_steps_use_kernels_and_match_small_steps(make_engine):
    """1024-token steps (Pallas KV write + flash) give the greedy tokens of 128-token steps."""
    rng = np.random.default_rng(0)
    prompts = [rng.integers(5, 512, 120).tolist() for _ in range(8)]
    sp = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    big = make_engine("llama", max_model_len=256, max_num_batched_tokens=1024, num_pages=160,
                      flash_prefill_min_tokens=1024, enable_prefix_caching=False)
    small = make_engine("llama", max_model_len=256, max_num_batched_tokens=128, num_pages=160,
                        flash_prefill_min_tokens=0, enable_prefix_caching=False)
    assert run_tokens(big, prompts, sp) == run_tokens(small, prompts, sp)


def test_bf16_fresh_step_runs_mosaic_kernel_once_and_matches_paged():
    """On Hopper the model's bf16 fresh-prompt step (the engine's ``_step_fresh``) embeds the
    Mosaic GPU flash kernel once for all layers (the dispatcher's jit wrapper, in the layer's), and its logits
    match the paged step's. A small random model with head_dim 64 (the golden ones use 16)."""
    if not mgpu.on_hopper():
        pytest.skip("Mosaic GPU kernel needs a Hopper (sm_90) GPU")
    cfg = ModelConfig(architecture="LlamaForCausalLM", vocab_size=512, hidden_size=256,
                      intermediate_size=512, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64)
    mesh = make_mesh(1)
    params = random_params(cfg, mesh, scale=0.1)
    page, pps = 16, 64
    kv = allocate_kv_cache(cfg, 1 + 4 * pps, page, "bfloat16", mesh)
    rng = np.random.default_rng(1)
    ids = [rng.integers(5, cfg.vocab_size, n) for n in (300, 1, 500, 150)]
    batch = StepInput.fresh_prompts(ids, 1024, 8, pps, page)
    fresh_step = jax.jit(functools.partial(forward, cfg, fresh_prefill=True, mesh=mesh), donate_argnums=(1,))
    paged_step = jax.jit(functools.partial(forward, cfg, mesh=mesh), donate_argnums=(1,))
    text = fresh_step.lower(params, kv, batch).as_text()
    # One kernel build, called from the nested-jit layer (jserve/model/decoder.py ``_layer``),
    # which every layer calls (the last one too: its unused residual output is kept, not pruned
    # into a second function).
    assert text.count("custom_call @mosaic_gpu") == 1
    assert text.count("call @_mgpu_jit(") == 1
    assert text.count("call @_layer(") == cfg.num_layers
    kv, fresh = fresh_step(params, kv, batch)
    kv, paged = paged_step(params, kv, batch)
    fresh = np.asarray(fresh, np.float32)[:4]
    paged = np.asarray(paged, np.float32)[:4]
    assert np.all(np.isfinite(fresh))
    assert np.linalg.norm(fresh - paged) / np.linalg.norm(paged) < 3e-2


def test_a_warm_start_loads_its_stored_step_executables(make_engine, tmp_path):
    """On a GPU the builder keeps each step variant serialized beside the compilation cache
    (jserve/executable_cache.py); the next start of the same engine loads every one without
    tracing or lowering and gives the same greedy and seeded sampled tokens."""
    prompts = [[3, 4, 5, 6], list(range(10, 40))]
    params = [SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=12, ignore_eos=True)]
    cold = make_engine("llama", compilation_cache_dir=str(tmp_path))
    split = cold.runner.split.buckets if cold.runner.split_wanted() else ()
    count = len(cold.runner.variants()) + 2 * len(split)   # the split step's pairs are kept too
    assert cold.runner.executables.stored == count and cold.runner.executables.loaded == 0
    want = [run_tokens(cold, prompts, sp) for sp in params]
    warm = make_engine("llama", compilation_cache_dir=str(tmp_path))
    assert warm.runner.executables.loaded == count and "lower_s" not in warm.runner.compile_timings
    assert all(warm.runner.split.ready(t) for t in split)
    assert [run_tokens(warm, prompts, sp) for sp in params] == want
    other = make_engine("llama", compilation_cache_dir=str(tmp_path), num_pages=96)   # another pool
    assert other.runner.executables.loaded == 0
