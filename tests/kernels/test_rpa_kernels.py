"""GPU (Triton) and TPU (Mosaic) ragged paged attention kernels vs the reference, interpret mode."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ragged_batch import make_batch, rel_err, run_fast
from rpa_cases import CASES

from pallas_kernels import kv_format
from pallas_kernels.ragged_paged_attention import gpu as rpa_gpu
from pallas_kernels.ragged_paged_attention import gpu_config as rpa_config
from pallas_kernels.ragged_paged_attention import gpu_splits as rpa_splits
from pallas_kernels.ragged_paged_attention import reference as rpa_ref
from pallas_kernels.ragged_paged_attention import tpu as rpa_tpu
from pallas_kernels.ragged_paged_attention import work


def _batch(name: str, seed: int = 0):
    c = CASES[name]
    b = make_batch(
        np.random.default_rng(seed), list(c.q_lens), list(c.ctx_lens), page_size=c.page_size,
        num_q_heads=c.num_q_heads, num_kv_heads=c.num_kv_heads, head_dim=c.head_dim, dtype=c.dtype,
        num_pages=c.num_pages,
    )  # fmt: skip
    kw = dict(
        sm_scale=c.head_dim**-0.5, sliding_window=c.sliding_window, soft_cap=c.soft_cap, **b.scale_kwargs()
    )
    return c, b, kw


def _check(c, b, got, want):
    n = b.query_start_loc[len(c.q_lens)]
    got = np.asarray(got.astype(np.float32))
    assert np.all(np.isfinite(got)), "NaN/inf leaked into the output"
    assert np.all(got[n:] == 0), "padding rows must be zeros"
    assert rel_err(got[:n], np.asarray(want.astype(np.float32))[:n]) < c.tol


GPU_CONFIGS = {
    "decode7_p16_d64": None,  # the default plan: two launches
    "prefill1_p8_d128": rpa_gpu.GpuConfig(block_q=16, pages_per_block=2),
    "mixed7_p32_d256_bf16": rpa_gpu.GpuPlan(
        decode=rpa_gpu.GpuConfig(block_q=2, pages_per_block=1, num_splits=3),
        prefill=rpa_gpu.GpuConfig(block_q=8, pages_per_block=1),
    ),
    "decode64_p8": rpa_gpu.GpuConfig(block_q=8, pages_per_block=2, num_splits=2, fused_combine=True),
    "window_softcap_g3": rpa_gpu.GpuPlan(
        decode=rpa_gpu.GpuConfig(block_q=1, pages_per_block=1, num_splits=2),
        prefill=rpa_gpu.GpuConfig(block_q=4, pages_per_block=2),
    ),
    "int8_kv": rpa_gpu.GpuConfig(block_q=2, pages_per_block=1, kv_compute="float16"),
    "fp8_kv": None,   # the default: dots in q's dtype
    "fp8_kv_qk8": rpa_gpu.GpuConfig(block_q=2, pages_per_block=2, kv_compute="float8"),
    "pool_70k_pages": None,
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_gpu_kernel_interpret(name):
    c, b, kw = _batch(name)
    want = jax.jit(lambda *a: rpa_ref.ragged_paged_attention(*a, **kw))(*b.args())
    got = run_fast(
        lambda *a: rpa_gpu.ragged_paged_attention(*a, interpret=True, config=GPU_CONFIGS[name], **kw),
        *b.args(),
    )
    _check(c, b, got, want)


def test_gpu_int8_pool_by_bit_assembly_matches_the_plain_conversion():
    """``GpuConfig.int8_f16_bits``: an int8 pool's K / V assembled into f16 (exact, as Triton's
    conversion) give the same output bits, in a mixed batch's work-list launch (prefill and
    decode rows) and in the direct decode launch of a plan."""
    c, b, kw = _batch("int8_kv")
    plain = rpa_gpu.GpuConfig(block_q=2, pages_per_block=1, kv_compute="float16")
    bits = dataclasses.replace(plain, int8_f16_bits=True)
    plan = rpa_gpu.GpuPlan(decode=bits, prefill=dataclasses.replace(bits, block_q=8))
    outs = [np.asarray(run_fast(lambda *a, cfg=cfg: rpa_gpu.ragged_paged_attention(
        *a, interpret=True, config=cfg, **kw), *b.args()), np.float32) for cfg in (plain, bits, plan)]
    np.testing.assert_array_equal(outs[1], outs[0])
    np.testing.assert_array_equal(outs[2], outs[0])
    want = jax.jit(lambda *a: rpa_ref.ragged_paged_attention(*a, **kw))(*b.args())
    _check(c, b, jnp.asarray(outs[1]), want)


def test_gpu_runtime_split_count_leaves_splits_unused():
    """64 live decodes x 2 kv heads use 3 of 4 configured splits: the fourth writes nothing and
    the merge must not read it (its partials are uninitialised memory)."""
    c, b, kw = _batch("decode64_p8")
    items = work.work_items(b.q.shape[0], 8, *b.args()[4:], q_max=8)
    assert int(rpa_gpu.active_splits(items, c.num_kv_heads, 4)[0]) == 3
    want = jax.jit(lambda *a: rpa_ref.ragged_paged_attention(*a, **kw))(*b.args())
    cfg = rpa_gpu.GpuConfig(block_q=8, pages_per_block=2, num_splits=4)
    got = run_fast(lambda *a: rpa_gpu.ragged_paged_attention(*a, interpret=True, config=cfg, **kw), *b.args())
    _check(c, b, got, want)
    live = jnp.asarray([[0, 1, 0, 0]] * 33 + [[0, 0, -1, 0]] * 31, jnp.int32)
    assert int(rpa_gpu.active_splits(live, 8, 16)[0]) == 1  # 33 x 8 programs fill two waves
    assert int(rpa_gpu.active_splits(live[:1], 8, 16)[0]) == 16  # batch-1: every split


def test_gpu_work_items_cover_every_row_once():
    b = make_batch(
        np.random.default_rng(0),
        [3, 1, 9],
        [3, 5, 12],
        page_size=8,
        num_q_heads=1,
        num_kv_heads=1,
        head_dim=8,
    )
    t = b.q.shape[0]
    items = np.asarray(work.work_items(t, 4, *b.args()[4:]))
    covered = np.zeros(t, int)
    for row0, rows, _, _ in items:
        covered[row0 : row0 + rows] += 1
    np.testing.assert_array_equal(covered, 1)
    # The two-launch split: decode class (q_len <= 1) and the rest (with the padding rows).
    covered[:] = 0
    for kw in (dict(q_max=1), dict(q_min=1)):
        for row0, rows, seq, pos0 in np.asarray(work.work_items(t, 2, *b.args()[4:], **kw)):
            covered[row0 : row0 + rows] += 1
            if rows and seq >= 0:
                assert pos0 == b.seq_lens[seq] - b.q_lens[seq] + (row0 - b.query_start_loc[seq])
    np.testing.assert_array_equal(covered, 1)


# decode7 (covered by decode64) and fp8 (same code path as int8) are left to the GPU kernel: each
# interpret-mode case costs seconds of compile on the 2-core CI machine.
TPU_CONFIGS = {
    "prefill1_p8_d128": rpa_tpu.TpuConfig(block_q=8, pages_per_block=2),
    "mixed7_p32_d256_bf16": rpa_tpu.TpuConfig(block_q=4, pages_per_block=1),
    "decode64_p8": rpa_tpu.TpuConfig(block_q=2, pages_per_block=4),
    "window_softcap_g3": rpa_tpu.TpuConfig(block_q=2, pages_per_block=1),
    "int8_kv": rpa_tpu.TpuConfig(block_q=2, pages_per_block=2),
    "pool_70k_pages": None,
}


@pytest.mark.parametrize("name", sorted(TPU_CONFIGS))
def test_tpu_kernel_interpret(name):
    c, b, kw = _batch(name, seed=1)
    want = jax.jit(lambda *a: rpa_ref.ragged_paged_attention(*a, **kw))(*b.args())
    got = run_fast(
        lambda *a: rpa_tpu.ragged_paged_attention(*a, interpret=True, config=TPU_CONFIGS[name], **kw),
        *b.args(),
    )
    _check(c, b, got, want)


@pytest.mark.parametrize("splits,min_blocks,one_round", [(1, 2, False), (3, 2, False), (3, 1, False),
                                                     (1, 2, True), (3, 2, True)])
def test_gpu_direct_decode_launch(splits, min_blocks, one_round, monkeypatch):
    """A call of at most block_q tokens runs one direct launch (item = sequence, no work list,
    split count counted in the kernel): a zero-length sequence between live ones, sequences past
    num_seqs and NaN padding rows, which must come out zero. With 3 splits and 8-key blocks the
    items (2, 3 and 8 blocks) use 1, 2 and 3 of them at ``min_blocks_per_split`` 2, and 2, 3 and 3
    at 1 (one block per program where the splits suffice: step_floor's attn-minblocks1). With
    the launch's metadata read in one round of loads (``DIRECT_ONE_ROUND``, the default) and in
    three (step_floor's attn-meta-three-rounds)."""
    monkeypatch.setattr(rpa_splits, "DIRECT_ONE_ROUND", one_round)
    b = make_batch(np.random.default_rng(4), [1, 2, 1, 1], [9, 30, 17, 60], page_size=8, num_q_heads=4,
                   num_kv_heads=2, head_dim=16, extra_seqs=2, extra_tokens=3)  # fmt: skip
    # Sequence 1 keeps its context but gets no rows this step; sequence 2's 2 rows follow seq 0.
    b.query_start_loc[:] = [0, 1, 1, 3, 4, 4, 4]
    b.q[4:] = np.nan
    kw = dict(sm_scale=0.25)
    want = jax.jit(lambda *a: rpa_ref.ragged_paged_attention(*a, **kw))(*b.args())
    cfg = rpa_gpu.GpuConfig(block_q=8, pages_per_block=1, num_splits=splits, min_blocks_per_split=min_blocks)
    assert b.q.shape[0] <= cfg.block_q  # the direct path
    got = run_fast(lambda *a: rpa_gpu.ragged_paged_attention(*a, interpret=True, config=cfg, **kw), *b.args())
    got = np.asarray(got, np.float32)
    assert np.all(np.isfinite(got)) and np.all(got[4:] == 0)
    assert rel_err(got[:4], np.asarray(want, np.float32)[:4]) < 1e-5


@pytest.mark.parametrize("splits,one_round", [(1, False), (2, False), (2, True)])
def test_gpu_max_q_len_runs_the_decode_launch_alone(splits, one_round, monkeypatch):
    """``max_q_len=1`` (the engine's decode-only steps): a bucket of 16 tokens with 5 one-token
    sequences, past the decode tile of 2 rows, runs the direct decode launch only, not the
    default two-launch plan; NaN padding rows and NaN-poisoned unused pages must not leak."""
    b = make_batch(np.random.default_rng(7), [1] * 5, [3, 40, 17, 1, 64], page_size=8, num_q_heads=8,
                   num_kv_heads=2, head_dim=16, extra_seqs=3, extra_tokens=11)  # fmt: skip
    assert b.q.shape[0] == 16
    b.q[5:] = np.nan
    monkeypatch.setattr(rpa_splits, "DIRECT_ONE_ROUND", one_round)
    kw = dict(sm_scale=0.25)
    want = jax.jit(lambda *a: rpa_ref.ragged_paged_attention(*a, **kw))(*b.args())
    plan = rpa_gpu.GpuPlan(decode=rpa_gpu.GpuConfig(block_q=2, pages_per_block=1, num_splits=splits),
                           prefill=rpa_gpu.GpuConfig(block_q=8, pages_per_block=1))
    launches = []
    launch = rpa_gpu._launch
    monkeypatch.setattr(rpa_gpu, "_launch", lambda cfg, meta, *a, **k: launches.append((cfg, len(meta)))
                        or launch(cfg, meta, *a, **k))
    fn = jax.jit(lambda *a: rpa_gpu.ragged_paged_attention(*a, interpret=True, config=plan, max_q_len=1,
                                                           **kw))
    got = np.asarray(run_fast(fn, *b.args()), np.float32)
    assert launches == [(plan.decode, 3)]  # one launch, direct (seq_lens, query_start_loc, num_seqs)
    assert np.all(np.isfinite(got)) and np.all(got[5:] == 0)
    assert rel_err(got[:5], np.asarray(want, np.float32)[:5]) < 1e-5
    with pytest.raises(ValueError, match="max_q_len"):
        rpa_gpu.ragged_paged_attention(*b.args(), sm_scale=0.25, interpret=True, max_q_len=0)


def test_gpu_decode_rows_put_verify_rows_in_the_decode_launch(monkeypatch):
    """``decode_rows=5`` (speculative verify rows, k = 4): the heuristic's decode tile holds 8
    rows (G = 4 would give 4), so sequences of 5 query rows take the decode class's direct
    launch with its KV splits, not the prefill tiles; the output equals the reference with NaN
    padding rows and NaN-poisoned unused pages."""
    b = make_batch(np.random.default_rng(11), [5, 5, 1, 5], [40, 9, 23, 64], page_size=8, num_q_heads=8,
                   num_kv_heads=2, head_dim=16, extra_seqs=3, extra_tokens=16)  # fmt: skip
    n = int(b.query_start_loc[4])
    b.q[n:] = np.nan
    kw = dict(sm_scale=0.25)
    want = jax.jit(lambda *a: rpa_ref.ragged_paged_attention(*a, **kw))(*b.args())
    t, s = b.q.shape[0], b.page_table.shape[0]
    plain = rpa_gpu.default_config(t, s, 8, 2, 8, b.page_table.shape[1])
    wide = rpa_gpu.default_config(t, s, 8, 2, 8, b.page_table.shape[1], decode_rows=5)
    assert plain.decode.block_q == 4 and wide.decode.block_q == 8 and wide.decode.num_splits > 1
    launches = []
    launch = rpa_gpu._launch
    monkeypatch.setattr(rpa_gpu, "_launch", lambda cfg, meta, *a, **k: launches.append((cfg, len(meta)))
                        or launch(cfg, meta, *a, **k))
    got = run_fast(lambda *a: rpa_gpu.ragged_paged_attention(*a, interpret=True, decode_rows=5, **kw),
                   *b.args())
    got = np.asarray(got, np.float32)
    assert np.all(np.isfinite(got)) and np.all(got[n:] == 0)
    assert rel_err(got[:n], np.asarray(want, np.float32)[:n]) < 1e-5
    assert [cfg for cfg, _ in launches] == [wide.prefill, wide.decode]
    items = np.asarray(work.work_items(t, wide.prefill.block_q, *b.args()[4:7], q_min=wide.decode.block_q))
    assert not np.any((items[:, 2] >= 0) & (items[:, 1] > 0)), "a sequence in the prefill launch"
    # max_q_len=5 (a speculative step of verify rows only, ``decode_only``): the decode class's
    # direct launch alone: no prefill tiles, no work list
    launches.clear()
    got = run_fast(lambda *a: rpa_gpu.ragged_paged_attention(*a, interpret=True, decode_rows=5, max_q_len=5,
                                                             **kw), *b.args())
    got = np.asarray(got, np.float32)
    assert launches == [(wide.decode, 3)]
    assert np.all(np.isfinite(got)) and np.all(got[n:] == 0)
    assert rel_err(got[:n], np.asarray(want, np.float32)[:n]) < 1e-5
    with pytest.raises(ValueError, match="decode_rows"):
        rpa_gpu.ragged_paged_attention(*b.args(), sm_scale=0.25, interpret=True, decode_rows=0)


@pytest.mark.parametrize("one_round", [False, True])
def test_gpu_decode_launch_lowers_for_cuda(one_round, monkeypatch):
    """Llama-3.1-8B's heads (32 / 8 x 128, 16-token pages) in a 16-row decode-only bucket,
    cross-lowered for CUDA on CPU (Triton, told it targets an H200), also with the direct
    launch's metadata read in one round (``DIRECT_ONE_ROUND``, the default) and in three
    (step_floor's attn-meta-three-rounds)."""
    from jax._src.pallas.triton import gpu_info, pallas_call_registration

    monkeypatch.setattr(pallas_call_registration.gpu_info_lib, "get_gpu_info",
                        lambda: gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H200))
    monkeypatch.setattr(rpa_splits, "DIRECT_ONE_ROUND", one_round)
    b = make_batch(np.random.default_rng(7), [1] * 5, [3, 40, 17, 1, 64], page_size=16, num_q_heads=32,
                   num_kv_heads=8, head_dim=128, extra_seqs=11, extra_tokens=11)  # fmt: skip
    fn = jax.jit(lambda *a: rpa_gpu.ragged_paged_attention(*a, sm_scale=0.1, max_q_len=1))
    assert "ragged_paged_attention" in fn.trace(*b.args()).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("target", [8, 64, 1056])
def test_gpu_decode_splits_follow_the_programs_target(target, monkeypatch):
    """``TARGET_PROGRAMS`` (264; kv_dtype_attention's --targets) sizes the decode launch's
    static split count, its grid and the splits a call uses: under 8, 64 and 1056 the engine's
    decode-only call (heuristic config, ``max_q_len=1``) splits 3 live sequences x 2 kv heads
    differently and matches the reference, NaN padding rows and NaN-poisoned pages kept out."""
    monkeypatch.setattr(rpa_splits, "TARGET_PROGRAMS", target)
    b = make_batch(np.random.default_rng(5), [1] * 3, [700, 300, 1000], page_size=8, num_q_heads=4,
                   num_kv_heads=2, head_dim=16, extra_seqs=5, extra_tokens=5)  # fmt: skip
    b.q[3:] = np.nan
    kw = dict(sm_scale=0.25)
    want = jax.jit(lambda *a: rpa_ref.ragged_paged_attention(*a, **kw))(*b.args())
    cfg = rpa_gpu.default_config(b.q.shape[0], b.page_table.shape[0], 4, 2, 8, b.page_table.shape[1])
    dec = cfg.decode if isinstance(cfg, rpa_gpu.GpuPlan) else cfg
    used = int(rpa_splits.splits_for(jnp.int32(3), 2, dec.num_splits))
    assert (dec.num_splits, used) == {8: (1, 1), 64: (16, 11), 1056: (16, 16)}[target]
    fn = jax.jit(lambda *a: rpa_gpu.ragged_paged_attention(*a, interpret=True, max_q_len=1, **kw))
    got = np.asarray(run_fast(fn, *b.args()), np.float32)
    assert np.all(np.isfinite(got)) and np.all(got[3:] == 0)
    assert rel_err(got[:3], np.asarray(want, np.float32)[:3]) < 1e-5


def test_gpu_quantized_unsplit_decode_keys_per_step(monkeypatch):
    """``default_config`` at head_dim 128, unsplit: int8 (converted by bit assembly) and fp8
    pools take 64 keys per step with a 128-key twin launch; with ``INT8_KV_F16_BITS`` off an int8
    pool takes one launch of 128 keys; ``QUANT_DECODE_KEYS`` (the A/B arms) sets one launch of
    that many for both at head_dim >= 128. Split launches, other head sizes, bf16 pools and the
    prefill class keep 64 keys per step."""
    def decode(rows: int, head_dim: int | None, pool: str | None = "fp8") -> rpa_gpu.GpuConfig:
        cfg = rpa_gpu.default_config(rows, rows, 32, 8, 16, 528, kv_pool=pool, head_dim=head_dim)
        return cfg.decode if isinstance(cfg, rpa_gpu.GpuPlan) else cfg

    def shape(c: rpa_gpu.GpuConfig) -> tuple:
        return c.num_splits, c.pages_per_block, c.wide_pages_per_block

    assert shape(decode(64, 128)) == shape(decode(64, 128, "int8")) == (1, 4, 8)
    assert decode(64, 128, "int8").int8_f16_bits and not decode(64, 128).int8_f16_bits   # (fp8 has no int8)
    plan = rpa_gpu.default_config(64, 64, 32, 8, 16, 528, kv_pool="int8", head_dim=128)
    assert plan.prefill.int8_f16_bits
    assert shape(decode(16, 128)) == shape(decode(16, 128, "int8")) == (32, 4, None)
    assert shape(decode(64, 256)) == shape(decode(64, 64, "int8")) == shape(decode(64, None)) == (1, 4, None)
    assert shape(decode(64, 128, None)) == (1, 4, None)
    verify = rpa_gpu.default_config(320, 64, 32, 8, 16, 528, decode_rows=5, kv_pool="int8", head_dim=128)
    assert shape(verify.decode) == (1, 4, None)   # 8 x 4 = 32 score rows: not the measured tile
    monkeypatch.setattr(rpa_config, "QUANT_DECODE_KEYS", 32)
    assert shape(decode(64, 128)) == shape(decode(64, 128, "int8")) == (1, 2, None)
    monkeypatch.setattr(rpa_config, "QUANT_DECODE_KEYS", 128)
    assert shape(decode(64, 256)) == (1, 8, None)
    plan = rpa_gpu.default_config(64, 64, 32, 8, 16, 528, kv_pool="int8", head_dim=128)
    assert plan.prefill.pages_per_block == 4   # the prefill class keeps its tiles
    monkeypatch.setattr(rpa_config, "QUANT_DECODE_KEYS", None)
    monkeypatch.setattr(rpa_config, "INT8_KV_F16_BITS", False)   # the arm attn-int8-f16-bits-off
    assert shape(decode(64, 128, "int8")) == (1, 8, None) and not decode(64, 128, "int8").int8_f16_bits
    assert shape(decode(64, 128)) == (1, 4, 8)
    with pytest.raises(ValueError, match="kv_pool"):
        decode(64, 128, "int4")
    with pytest.raises(ValueError, match="wide_pages_per_block"):
        rpa_gpu.GpuConfig(pages_per_block=4, wide_pages_per_block=4)


def test_gpu_split_twin_config(monkeypatch):
    """``DECODE_SPLIT_TWIN`` (on; off, the arm attn-split-twin-off): an unsplit decode class gets
    a split twin of 2-warp programs sized for the few sequences it serves; a split class (the
    16-row bucket) and short page tables (no split for one sequence) get none; off, none. A model
    of more than 16 kv heads leaves its 16-row bucket unsplit: the twin serves its batch 1."""
    def decode(rows: int, width: int = 528, pool: str | None = None, kv_heads: int = 8) -> rpa_gpu.GpuConfig:
        cfg = rpa_gpu.default_config(rows, rows, 32, kv_heads, 16, width, kv_pool=pool, head_dim=128)
        return cfg.decode if isinstance(cfg, rpa_gpu.GpuPlan) else cfg

    twin = decode(256).split_twin
    assert (twin.num_splits, twin.num_warps, twin.block_q) == (32, 2, decode(256).block_q)
    fp8 = decode(64, pool="fp8")
    assert fp8.wide_pages_per_block == 8 and fp8.split_twin.num_splits > 1
    assert decode(16).split_twin is None and decode(16).num_splits > 1
    mha = decode(16, kv_heads=32)
    assert mha.num_splits == 1 and mha.split_twin.num_splits > 1
    assert decode(64, width=4).split_twin is None
    monkeypatch.setattr(rpa_config, "DECODE_SPLIT_TWIN", False)
    assert decode(64).split_twin is None and decode(256).split_twin is None
    with pytest.raises(ValueError, match="split_twin"):
        rpa_gpu.GpuConfig(split_twin=rpa_gpu.GpuConfig(num_splits=1))
    with pytest.raises(ValueError, match="twins"):
        rpa_gpu.GpuPlan(decode=rpa_gpu.GpuConfig(block_q=2),
                        prefill=rpa_gpu.GpuConfig(split_twin=rpa_gpu.GpuConfig(num_splits=2)))


def _without_twin(cfg):
    """``cfg`` (a GpuConfig or GpuPlan) with its decode class's split twin removed."""
    if isinstance(cfg, rpa_gpu.GpuPlan):
        return dataclasses.replace(cfg, decode=dataclasses.replace(cfg.decode, split_twin=None))
    return dataclasses.replace(cfg, split_twin=None)


@pytest.mark.parametrize("pool,head_dim", [(jnp.bfloat16, 64), (kv_format.FP8_BITS, 128)])
def test_gpu_split_twin_matches_the_reference(monkeypatch, pool, head_dim):
    """The split twin beside an unsplit decode class (an fp8 pool's at head_dim 128 also a
    narrow / wide pair), ``TARGET_PROGRAMS`` lowered to 8 so that 3 sequences x 2 kv heads take
    the twin and 5 the unsplit launch(es): calls of one row per sequence (the engine's decode-only
    calls, which launch the twin as two-row calls do), verify-like calls of two rows per sequence,
    and a mixed one (prefill rows in the plan's other class), NaN-poisoned unused pages, against
    the reference."""
    monkeypatch.setattr(rpa_splits, "TARGET_PROGRAMS", 8)
    monkeypatch.setattr(rpa_splits, "SMS", 1)
    batches = (([1] * 3, [70, 9, 190]), ([1] * 5, [70, 9, 190, 33, 120]), ([2] * 3, [70, 9, 190]),
               ([2] * 5, [70, 9, 190, 33, 120]), ([1, 6, 1], [150, 40, 99]))
    for q_lens, ctx in batches:
        b = make_batch(np.random.default_rng(len(ctx)), q_lens, ctx, page_size=8, num_q_heads=4,
                       num_kv_heads=2, head_dim=head_dim, dtype=pool)  # fmt: skip
        kind = None if pool == jnp.bfloat16 else "fp8"
        cfg = rpa_gpu.default_config(b.q.shape[0], b.page_table.shape[0], 4, 2, 8, b.page_table.shape[1],
                                     kv_pool=kind, head_dim=head_dim)
        dec = cfg.decode if isinstance(cfg, rpa_gpu.GpuPlan) else cfg
        assert dec.split_twin is not None and dec.split_twin.num_splits > 1
        kw = dict(sm_scale=head_dim**-0.5, **b.scale_kwargs())
        want = jax.jit(lambda *a, kw=kw: rpa_ref.ragged_paged_attention(*a, **kw))(*b.args())
        m = max(q_lens) if max(q_lens) <= 2 else None
        fn = jax.jit(lambda *a, kw=kw, m=m: rpa_gpu.ragged_paged_attention(*a, interpret=True, max_q_len=m,
                                                                           **kw))
        if m == 1:   # the one-row call launches the twin as a two-row call does, and more than
            #          the same call without the twin
            launches = [str(jax.make_jaxpr(lambda *a, kw=kw, m=m, c=c: rpa_gpu.ragged_paged_attention(
                *a, interpret=True, max_q_len=m, config=c, **kw))(*b.args())).count("pallas_call")
                for m, c in ((1, cfg), (2, cfg), (1, _without_twin(cfg)))]
            assert launches[0] == launches[1] > launches[2], launches
        got = np.asarray(run_fast(fn, *b.args()), np.float32)
        n = b.query_start_loc[len(q_lens)]
        assert np.all(np.isfinite(got)) and np.all(got[n:] == 0)
        assert rel_err(got[:n], np.asarray(want, np.float32)[:n]) < 2e-2


def test_gpu_wide_keys_win_by_rounds():
    """The fp8 pair's rule at 132 SMs and 8 kv heads: 40 sequences take one round of narrow
    programs and two of wide ones (narrow); 16 and 64 take as many of each (wide)."""
    def wins(live: int) -> bool:
        return bool(rpa_splits.wide_keys_win(jnp.int32(live * 8)))

    assert [wins(n) for n in (0, 1, 16, 33, 40, 49, 50, 64)] == [False, True, True, True, False, False,
                                                                  True, True]


@pytest.mark.parametrize("keys,pool,bits", [(128, kv_format.FP8_BITS, False), (32, kv_format.FP8_BITS, False),
                                            (32, jnp.int8, False), (None, jnp.int8, False),
                                            (None, kv_format.FP8_BITS, False), (None, jnp.int8, True)])
def test_gpu_quantized_decode_keys_match_the_reference(monkeypatch, keys, pool, bits):
    """Keys per step over an fp8 / int8 pool at head_dim 128 (unsplit: TARGET_PROGRAMS lowered so
    the sequences x 1 kv head fill it): the defaults (fp8, and int8 converted by bit assembly:
    the narrow / wide pair, one SM so that 3 sequences take the narrow launch and 4 the wide
    one; int8 by Triton's conversion with the switch off: 128 keys) and the A/B arms, with
    NaN-poisoned unused pages and scales, the engine's decode-only call, against the reference."""
    monkeypatch.setattr(rpa_splits, "TARGET_PROGRAMS", 4)
    monkeypatch.setattr(rpa_splits, "SMS", 1)
    monkeypatch.setattr(rpa_config, "QUANT_DECODE_KEYS", keys)
    monkeypatch.setattr(rpa_config, "INT8_KV_F16_BITS", bits)
    for ctx in ([70, 9, 130], [70, 9, 130, 33]):
        b = make_batch(np.random.default_rng(9), [1] * len(ctx), ctx, page_size=8, num_q_heads=4,
                       num_kv_heads=1, head_dim=128, dtype=pool)  # fmt: skip
        kind = "int8" if pool == jnp.int8 else "fp8"
        cfg = rpa_gpu.default_config(b.q.shape[0], b.page_table.shape[0], 4, 1, 8, b.page_table.shape[1],
                                     kv_pool=kind, head_dim=128)
        dec = cfg.decode if isinstance(cfg, rpa_gpu.GpuPlan) else cfg
        pair = keys is None and (kind == "fp8" or bits)
        want_keys = keys or (64 if pair else 128)
        assert (dec.num_splits, dec.pages_per_block * 8, dec.int8_f16_bits) == (1, want_keys, bits)
        assert dec.wide_pages_per_block == (16 if pair else None)
        assert bool(rpa_splits.wide_keys_win(jnp.int32(len(ctx)))) == (len(ctx) == 4)
        kw = dict(sm_scale=128**-0.5, **b.scale_kwargs())
        want = jax.jit(lambda *a, kw=kw: rpa_ref.ragged_paged_attention(*a, **kw))(*b.args())
        fn = jax.jit(lambda *a, kw=kw: rpa_gpu.ragged_paged_attention(*a, interpret=True, max_q_len=1, **kw))
        got = np.asarray(run_fast(fn, *b.args()), np.float32)
        assert np.all(np.isfinite(got))
        assert rel_err(got, np.asarray(want, np.float32)) < 2e-2
