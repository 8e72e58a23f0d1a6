"""The draft's fused decode layers (jserve/model/fused_decode.py): same hidden states and K/V
as the unfused decode forward, the trace-time gate, and the draft loop's wiring."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from engine_helpers import run_engine
from fixture_paths import GOLDEN

from checkpoints import HFModelDir
from jserve.config import ModelConfig
from jserve.kv_cache import allocate_kv_cache
from jserve.model import fused_decode
from jserve.model.decoder import hidden_states
from jserve.model.params import load_params, random_params
from jserve.sampling_params import SamplingParams
from jserve.step_input import StepInput
from sharding import make_mesh


def _setup(arch: str, pages: int = 12, ps: int = 4):
    mdir = HFModelDir(GOLDEN / arch)
    cfg = ModelConfig.from_hf_config(mdir.config, dtype="float32")
    params = load_params(mdir, cfg, make_mesh(1))
    kv = allocate_kv_cache(cfg, pages, ps, "float32", make_mesh(1))
    return cfg, params, kv


def _short_step(prompts, counts, ps=4, pages_per_seq=4, rows=3, tokens=8):
    """Prefill the prompts (fresh, pages from 1), then a step of ``counts[r]`` new tokens per
    row after each prompt (1: a decode row; more: a verify row), padded to ``tokens``."""
    prefill = StepInput.fresh_prompts([np.asarray(p, np.int32) for p in prompts], 32, rows,
                                      pages_per_seq, ps)
    table = prefill.page_table
    b = StepInput.empty(tokens, rows, pages_per_seq)
    t = 0
    for r, (p, n) in enumerate(zip(prompts, counts, strict=True)):
        for i in range(n):
            pos = len(p) + i
            b.token_ids[t], b.positions[t] = 7 + 3 * t, pos
            b.slot_mapping[t] = table[r, pos // ps] * ps + pos % ps
            t += 1
        b.page_table[r] = table[r]
        b.seq_lens[r] = len(p) + n
        b.query_start_loc[r + 1:] = t
        b.logits_indices[r] = t - 1
    b.num_seqs[0] = len(prompts)
    return prefill, dataclasses.replace(b, decode_rows=max(counts))


@pytest.mark.parametrize("arch,counts", [("llama", (1, 1)), ("qwen2", (1, 1)), ("llama", (1, 3))])
def test_fused_layers_equal_the_short_row_forward(arch, counts):
    """Two live rows after contexts of 5 and 9 tokens (decode rows, or a 3-token verify row
    whose tokens attend each other), an idle row and padding tokens: the normed hidden states
    and the K/V written agree with ``hidden_states(decode_only=True)`` (f32; idle rows and
    padding tokens are not compared: the unfused forward computes garbage there, the fused one
    passes x through)."""
    cfg, params, kv = _setup(arch)
    prefill, step = _short_step([list(range(3, 8)), list(range(20, 29))], counts)
    _, kv = hidden_states(cfg, params, kv, prefill)
    want_h, want_kv = hidden_states(cfg, params, kv, step, decode_only=True)
    got_h, got_kv = fused_decode.fused_decode_hidden(cfg, params, kv, step)
    n = sum(counts)
    np.testing.assert_allclose(np.asarray(got_h)[:n], np.asarray(want_h)[:n], rtol=1e-4, atol=1e-4)
    for (gk, gv), (wk, wv) in zip(got_kv, want_kv, strict=True):
        np.testing.assert_allclose(np.asarray(gk)[1:], np.asarray(wk)[1:], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(np.asarray(gv)[1:], np.asarray(wv)[1:], rtol=1e-4, atol=1e-5)


def test_gate():
    """GPU, one device, small dense layers, unquantized pools, few rows; nothing else."""
    mdir = HFModelDir(GOLDEN / "llama")
    cfg = ModelConfig.from_hf_config(mdir.config, dtype="bfloat16")
    mesh = make_mesh(1)
    params = random_params(cfg, mesh)
    kv = allocate_kv_cache(cfg, 8, 16, "bfloat16", mesh)
    fits = lambda **kw: fused_decode.fused_decode_fits(  # noqa: E731
        cfg, kw.get("params", params), kw.get("kv", kv), mesh, kw.get("rows", 2), kw.get("backend", "gpu"))
    assert fits()
    assert not fits(backend="cpu") and not fits(backend="tpu")
    assert not fits(rows=fused_decode.FUSED_MAX_ROWS + 1)
    assert not fits(kv=allocate_kv_cache(cfg, 8, 16, "int8", mesh))
    assert not fits(params=random_params(cfg, mesh, quantization="int8"))
    big = dict(params, wgu=np.zeros((2, 64, 2, 16384), np.float32))
    assert not fits(params=big)


def test_draft_loop_runs_the_fused_layers(monkeypatch, make_engine):
    """The gate forced open on CPU (the entry point runs the kernel's reference): the draft's
    decodes and its first forward over verify rows (greedy variants) go through
    ``fused_decode_hidden``; greedy output equals the target alone's and a
    self-draft is still accepted (the drafts are the target's own argmaxes)."""
    import jax

    from jserve.spec import draft

    calls = []
    fused = fused_decode.fused_decode_hidden

    def record(cfg, params, kv, step):
        calls.append(step.decode_rows)
        return fused(cfg, params, kv, step)

    monkeypatch.setattr(draft, "fused_decode_fits", lambda *a: True)
    monkeypatch.setattr(draft, "fused_decode_hidden", record)
    jax.clear_caches()   # (other tests' engines traced the same step)
    spec = {"method": "draft_model", "model": str(GOLDEN / "llama"), "num_speculative_tokens": 3,
            "disable_by_batch_size": None}
    base = make_engine("llama", max_num_seqs=2, async_scheduling=False)
    eng = make_engine("llama", max_num_seqs=2, speculative_config=spec)
    assert set(calls) == {1, 4}   # the decodes and the greedy variants' first forward
    rng = np.random.default_rng(4)
    sp = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    items = [(rng.integers(5, 500, n).tolist(), sp) for n in (9, 23)]
    toks = lambda e: [o.outputs[0].token_ids for o in run_engine(e, items)]  # noqa: E731
    assert toks(eng) == toks(base)
    s = eng.kv_cache_stats()
    assert s["spec_decode_num_accepted_tokens"] >= 0.9 * s["spec_decode_num_draft_tokens"] > 0
