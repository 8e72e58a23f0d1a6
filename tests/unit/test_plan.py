"""``jserve plan``: a hand calculation, and the planner's figures equal what start-up computes."""

import math
from dataclasses import dataclass

import jax
import pytest

from jserve.builder import (
    EngineArgs,
    build_engine,
    make_engine_config,
    memory_budget,
    plan_pool,
    resolve_model,
    runner_state_bytes,
)
from jserve.cli import main
from jserve.gpus import lookup_accelerator
from jserve.model.params import load_params, params_bytes
from jserve.plan import plan_capacity
from sharding import make_mesh


def test_llama31_8b_on_h100_at_8k_bf16_kv_matches_hand_calculation(capsys):
    # Llama-3.1-8B's config.json: hidden 4096, MLP 14336, 32 layers, 32 q / 8 kv heads of 128, vocab 128256.
    h, mlp, layers, q_heads, kv_heads, hd, vocab = 4096, 14336, 32, 32, 8, 128, 128256
    per_layer = (h * q_heads * hd + 2 * h * kv_heads * hd + q_heads * hd * h) + 3 * h * mlp + 2 * h
    params = layers * per_layer + 2 * vocab * h + h           # untied embed + lm_head, final norm
    assert params == 8_030_261_248
    weights = 2 * params                                       # bf16
    # H100-80GB: nvidia-smi total 81559 MiB; the engine may use gpu_memory_utilization (0.9) of it
    # (start-up sets JAX's allocator to that share).
    usable = int(81559 * 2**20 * 0.9)
    assert usable == 76_968_728_985
    state = 64 * vocab * 4                                     # penalty statistics: 64 seqs x vocab int32
    state += 65 * (vocab // 32 + 2 * 300) * 4                  # token masks + logit biases, + a padding row
    automata = (256 * 2**20) // (2 * vocab)                    # token-automaton states in 256 MiB
    state += (automata + 1) * vocab * 2                        # int16 [states + a free row, vocab]
    # Activations (estimated; start-up measures them): a 512-token step's hidden, QKV and MLP
    # activations in bf16, 6 float32 copies of the 64 rows' logits, and the largest page move to
    # host memory and back (swap: calls of 64 pages, held five times: gathered, stacked then split;
    # uploaded, stacked then scattered).
    acts = 512 * (2 * h + kv_heads * (4 + 2) * hd + 3 * mlp) * 2 + 6 * 64 * vocab * 4
    acts += 5 * 64 * 16 * 2 * layers * kv_heads * hd * 2
    assert acts == 926_810_112
    headroom = max(acts // 4, usable // 256)    # the allocator's room beyond the peaks
    budget = usable - weights - state - acts - headroom
    kv_per_token = 2 * layers * kv_heads * hd * 2              # K and V, bf16
    assert kv_per_token == 131_072
    page_bytes = 16 * kv_per_token
    pages = budget // page_bytes
    seqs = (pages - 1) // (8192 // 16)                         # page 0 is the null page
    assert (budget, pages, seqs) == (59_378_137_600, 28_313, 55)   # vLLM's figure: about 50

    assert main(["plan", "--model", "llama3.1-8b", "--gpu", "H100-80GB", "--context", "8192",
                 "--kv-cache-dtype", "bfloat16", "--tp", "1"]) == 0
    out = capsys.readouterr().out
    assert f"8,030,261,248 params x 2 B (bfloat16) = {weights:,} B" in out
    assert "x 0.9 gpu_memory_utilization (--gpu-memory-utilization" in out
    assert f"= {usable:,} B (71.68 GiB) usable per device" in out
    assert f"activations {acts:,} B" in out and "--activation-memory-bytes" in out
    assert "+ 64 pages x 5 of the largest move to host memory (--swap-space 0" in out
    assert f"{usable:,} usable - {weights:,} weights - {state:,} state - {acts:,} activations " \
           f"- {headroom:,} allocator headroom (max(activations / 4, usable / 256)) = {budget:,} B" in out
    assert f"x 2 B (bfloat16; --kv-cache-dtype) = {kv_per_token:,} B (128.00 KiB)" in out
    assert f"{kv_per_token:,} B x 16 tokens (--page-size) = {page_bytes:,} B (2.00 MiB)" in out
    assert f"{budget:,} // {page_bytes:,} = {pages:,} pages" in out
    assert f"{pages - 1:,} usable pages // (ceil(8,192 / 16) = 512 pages per sequence) = {seqs} " \
           f"concurrent sequences of 8,192 tokens" in out


def test_plan_reports_what_does_not_fit_and_the_tp_that_does():
    plan = plan_capacity("llama3.1-70b", gpu="H100-80GB", max_model_len=8192)
    assert not plan.fits and plan.pool is None and plan.budget_bytes < 0
    assert plan.min_fitting_tp == 2     # 65.7 GiB of weights per device leave 5.7 GiB of 71.7
    assert "DOES NOT FIT" in plan.render() and "--tp 2" in plan.render()
    assert plan_capacity("llama3.1-70b", gpu="H100-80GB", max_model_len=8192,
                         tensor_parallel_size=2).fits


def test_plan_tensor_parallel_splits_weights_and_kv_heads():
    one = plan_capacity("qwen2.5-0.5b", gpu="TPU v6e", max_model_len=4096)
    two = plan_capacity("qwen2.5-0.5b", gpu="tpu-v6e", max_model_len=4096, tensor_parallel_size=2)
    assert one.accelerator.memory_bytes == 32 * 2**30         # TPUs: HBM
    assert one.memory.usable_bytes == int(32 * 2**30 * 0.9)   # gpu_memory_utilization of it
    assert two.weight_bytes_per_device == one.weight_bytes_total // 2
    assert two.kv_bytes_per_token * 2 == one.kv_bytes_per_token   # 2 kv heads, one per device
    assert two.pool.num_pages > one.pool.num_pages


def test_gpu_names_and_byte_counts():
    assert lookup_accelerator("h100").name == "H100-80GB"
    assert lookup_accelerator("80GiB").usable_bytes(0.9) == 80 * 2**30   # bytes: the usable memory
    assert lookup_accelerator("24GB").usable_bytes(0.5) == 24 * 10**9
    assert lookup_accelerator(12345).usable_bytes(0.9) == 12345
    assert lookup_accelerator("H200").usable_bytes(0.9) == int(143771 * 2**20 * 0.9)
    with pytest.raises(ValueError, match="unknown accelerator 'B200'"):
        lookup_accelerator("B200")


@dataclass
class _Device:
    """A GPU's memory report, in the form ``jax.Device.memory_stats()`` gives it."""

    bytes_limit: int
    bytes_in_use: int = 0
    platform: str = "gpu"

    def memory_stats(self) -> dict[str, int]:
        return {"bytes_limit": self.bytes_limit, "bytes_in_use": self.bytes_in_use}


@pytest.mark.parametrize("tp", [1, 2])
def test_planner_equals_startup_for_the_bundled_model(tp, monkeypatch):
    """Start-up's own path (memory_budget -> plan_pool, weights measured on the loaded params,
    the allocator created with gpu_memory_utilization's share) and the planner (weights from the
    config, ``--gpu`` the usable bytes) agree on every figure."""
    util, ctx, acts = 0.5, 512, 3 * 2**20
    limit = 48 * 2**20                      # bytes_limit of an allocator made with share 0.5
    monkeypatch.setenv("XLA_CLIENT_MEM_FRACTION", str(util))   # what allow_device_memory sets
    # (a 48 MiB device: a 64-state token-automaton table, 1 MiB, not the default's 32 MiB)
    args = EngineArgs(model=None, max_model_len=ctx, tensor_parallel_size=tp,
                      gpu_memory_utilization=util, activation_memory_bytes=acts, grammar_device_states=64)
    cfg, model_dir = resolve_model(args)
    params = load_params(model_dir, cfg, make_mesh(tp))
    startup_weights = params_bytes(params) // tp
    config = make_engine_config(args, cfg)
    budget = memory_budget(config, startup_weights, _Device(limit, startup_weights), lambda: 1 / 0)
    startup = plan_pool(config, budget)

    plan = plan_capacity(None, gpu=limit, max_model_len=ctx, tensor_parallel_size=tp,
                         gpu_memory_utilization=util, activation_memory_bytes=acts, grammar_device_states=64)
    assert plan.weight_bytes_per_device == startup_weights
    assert plan.memory == budget and plan.pool == startup
    state = runner_state_bytes(config)   # the penalty statistics, masks, token automata
    assert state > (64 + 1) * 8192 * 2
    headroom = max(acts // 4, limit // 256)    # the allocator's room beyond the peaks
    assert plan.budget_bytes == limit - startup_weights - state - acts - headroom
    assert plan.pool.num_pages == plan.budget_bytes // (plan.kv_bytes_per_token * 16)
    assert plan.pool.max_concurrent_seqs == (plan.pool.num_pages - 1) // math.ceil(ctx / 16)


def test_startup_counts_what_the_device_already_holds(monkeypatch):
    monkeypatch.setenv("XLA_CLIENT_MEM_FRACTION", "0.5")
    args = EngineArgs(model=None, max_model_len=256, activation_memory_bytes=0, grammar_device_states=64)
    config = make_engine_config(args, resolve_model(args)[0])
    budget = memory_budget(config, 10 * 2**20, _Device(64 * 2**20, 12 * 2**20), lambda: 1 / 0)
    assert budget.other_bytes == 2 * 2**20      # in use beyond the weights: not the pool's
    assert budget.kv_bytes == 64 * 2**20 - 12 * 2**20 - runner_state_bytes(config) - 64 * 2**20 // 256


def test_engine_allocates_the_planned_pool(xla_cache_dir):
    """An engine built with the planner's page count reports the same pool and allocates exactly
    ``pool_bytes`` of KV."""
    plan = plan_capacity(None, gpu="40MiB", max_model_len=128, max_num_seqs=4,
                         max_num_batched_tokens=32, grammar_device_states=64)
    engine = build_engine(EngineArgs(model=None, max_model_len=128, max_num_seqs=4,
                                     max_num_batched_tokens=32, num_pages=plan.pool.num_pages,
                                     grammar_device_states=64,
                                     compilation_cache_dir=xla_cache_dir))
    assert engine.startup.pool_plan == plan.pool
    kv_bytes = sum(x.nbytes for x in jax.tree.leaves(engine.runner.kv))
    assert kv_bytes == plan.pool.pool_bytes
    assert params_bytes(engine.runner.params) == plan.weight_bytes_total
