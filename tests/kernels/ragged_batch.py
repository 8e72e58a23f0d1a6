"""Builders of random ragged paged-attention batches and a per-token numpy oracle (test helper).

A batch mimics what the runner packs: sequences with a query chunk of ``q_len`` rows that are
the last rows of a ``ctx_len`` context, pages drawn at random from the whole pool (shuffled),
padding rows/sequences after ``num_seqs``, and every page not used by a sequence filled with
NaN (or, for int8 pools that cannot hold NaN, NaN scales) so that a stray read shows.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from pallas_kernels import kv_format


@dataclasses.dataclass
class Batch:
    q: np.ndarray  # [num_tokens, num_q_heads, head_dim]
    k_pages: np.ndarray  # [num_pages, page_size, num_kv_heads, head_dim]
    v_pages: np.ndarray  # [num_pages, page_size, num_kv_heads, head_dim]
    page_table: np.ndarray  # int32[max_seqs, pages_per_seq]
    seq_lens: np.ndarray  # int32[max_seqs]
    query_start_loc: np.ndarray  # int32[max_seqs + 1]
    num_seqs: np.ndarray  # int32[1]
    k_scales: np.ndarray | None  # float32[num_pages, num_kv_heads]
    v_scales: np.ndarray | None
    q_lens: list[int]
    ctx_lens: list[int]

    def args(self) -> tuple:
        return (
            jnp.asarray(self.q), jnp.asarray(self.k_pages), jnp.asarray(self.v_pages),
            jnp.asarray(self.page_table), jnp.asarray(self.seq_lens),
            jnp.asarray(self.query_start_loc), jnp.asarray(self.num_seqs),
        )  # fmt: skip

    def scale_kwargs(self) -> dict:
        if self.k_scales is None:
            return {}
        return {"k_scales": jnp.asarray(self.k_scales), "v_scales": jnp.asarray(self.v_scales)}


def make_batch(
    rng: np.random.Generator,
    q_lens: list[int],
    ctx_lens: list[int],
    *,
    page_size: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype=jnp.float32,
    extra_seqs: int = 1,
    extra_tokens: int = 3,
    extra_pages_per_seq: int = 1,
    num_pages: int | None = None,
    poison: bool = True,
) -> Batch:
    """Random batch; ``dtype`` is the KV dtype (q is float32 for 1-byte KV, else ``dtype``)."""
    assert len(q_lens) == len(ctx_lens) and all(0 < q <= c for q, c in zip(q_lens, ctx_lens, strict=True))
    n = len(q_lens)
    max_seqs = n + extra_seqs
    needed = [-(-c // page_size) for c in ctx_lens]
    pages_per_seq = max(needed) + extra_pages_per_seq
    used = sum(needed)
    if num_pages is None:
        num_pages = 1 + used + 5
    assert num_pages >= 1 + used
    perm = rng.permutation(np.arange(1, num_pages))[:used]
    page_table = np.zeros((max_seqs, pages_per_seq), np.int32)
    off = 0
    for i, m in enumerate(needed):
        page_table[i, :m] = perm[off : off + m]
        off += m
    seq_lens = np.zeros(max_seqs, np.int32)
    seq_lens[:n] = ctx_lens
    qsl = np.zeros(max_seqs + 1, np.int32)
    qsl[1 : n + 1] = np.cumsum(q_lens)
    qsl[n + 1 :] = qsl[n]
    num_tokens = int(qsl[n]) + extra_tokens

    kv_dtype = jnp.dtype(dtype)
    as_bits = kv_dtype == kv_format.FP8_BITS   # the engine's fp8 pool: uint8 e4m3 bits
    if as_bits:
        kv_dtype = kv_format.FP8
    quant = kv_dtype.itemsize == 1
    shape = (num_pages, page_size, num_kv_heads, head_dim)
    k_scales = v_scales = None
    if quant:
        if jnp.issubdtype(kv_dtype, jnp.integer):
            k = rng.integers(-127, 128, size=shape).astype(np.int8)
            v = rng.integers(-127, 128, size=shape).astype(np.int8)
        else:
            k = np.array(jnp.asarray(rng.standard_normal(shape, np.float32) * 2).astype(kv_dtype))
            v = np.array(jnp.asarray(rng.standard_normal(shape, np.float32) * 2).astype(kv_dtype))
        k_scales = rng.uniform(0.005, 0.02, size=(num_pages, num_kv_heads)).astype(np.float32)
        v_scales = rng.uniform(0.005, 0.02, size=(num_pages, num_kv_heads)).astype(np.float32)
        q = rng.standard_normal((num_tokens, num_q_heads, head_dim)).astype(np.float32)
    else:
        k = np.array(jnp.asarray(rng.standard_normal(shape, np.float32)).astype(kv_dtype))
        v = np.array(jnp.asarray(rng.standard_normal(shape, np.float32)).astype(kv_dtype))
        q = np.array(
            jnp.asarray(rng.standard_normal((num_tokens, num_q_heads, head_dim), np.float32)).astype(kv_dtype)
        )
    if poison:
        unused = np.setdiff1d(np.arange(num_pages), perm)  # includes page 0
        # Also poison the tail of each sequence's last page (slots past its length).
        tails = [(page_table[i, needed[i] - 1], ctx_lens[i] % page_size) for i in range(n)]
        if quant and jnp.issubdtype(kv_dtype, jnp.integer):
            k_scales[unused] = np.nan
            v_scales[unused] = np.nan
            for p, o in tails:
                if o:
                    k[p, o:] = 127
                    v[p, o:] = -127
        else:
            nan = np.array(np.nan, np.float32).astype(k.dtype)
            k[unused] = nan
            v[unused] = nan
            for p, o in tails:
                if o:
                    k[p, o:] = nan
                    v[p, o:] = nan
            if quant:
                k_scales[unused] = np.nan
                v_scales[unused] = np.nan
        q[qsl[n] :] = np.array(np.nan, np.float32).astype(q.dtype)  # padding rows hold garbage
    if as_bits:
        k, v = k.view(np.uint8), v.view(np.uint8)
    return Batch(
        q=q, k_pages=k, v_pages=v, page_table=page_table, seq_lens=seq_lens, query_start_loc=qsl,
        num_seqs=np.array([n], np.int32), k_scales=k_scales, v_scales=v_scales,
        q_lens=list(q_lens), ctx_lens=list(ctx_lens),
    )  # fmt: skip


def numpy_attention(
    b: Batch, *, sm_scale: float, sliding_window: int | None = None, soft_cap: float | None = None
) -> np.ndarray:
    """The dumbest correct answer: one query row and one head at a time, float64."""
    q = b.q.astype(np.float64)
    k = np.asarray(kv_format.values(jnp.asarray(b.k_pages)).astype(jnp.float32), np.float64)
    v = np.asarray(kv_format.values(jnp.asarray(b.v_pages)).astype(jnp.float32), np.float64)
    num_tokens, hq, _ = q.shape
    ps, hkv = k.shape[1], k.shape[2]
    out = np.zeros(q.shape, np.float64)
    for i, (ql, cl) in enumerate(zip(b.q_lens, b.ctx_lens, strict=True)):
        for j in range(ql):
            t = b.query_start_loc[i] + j
            p = cl - ql + j
            lo = 0 if sliding_window is None else max(0, p - sliding_window + 1)
            for h in range(hq):
                kh = h // (hq // hkv)
                rows = [(b.page_table[i, x // ps], x % ps) for x in range(lo, p + 1)]
                keys = np.stack([k[pg, o, kh] for pg, o in rows])
                vals = np.stack([v[pg, o, kh] for pg, o in rows])
                if b.k_scales is not None:
                    keys = keys * np.array([b.k_scales[pg, kh] for pg, _ in rows])[:, None]
                    vals = vals * np.array([b.v_scales[pg, kh] for pg, _ in rows])[:, None]
                s = keys @ q[t, h] * sm_scale
                if soft_cap is not None:
                    s = soft_cap * np.tanh(s / soft_cap)
                w = np.exp(s - s.max())
                out[t, h] = (w / w.sum()) @ vals
    return out


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| / max |want| over all entries (both cast to float64)."""
    got = np.asarray(jnp.asarray(got).astype(jnp.float32), np.float64)
    want = np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def run_fast(fn, *args):
    """jit ``fn`` and run it on ``args``, compiled at XLA's lowest backend optimisation level.

    Interpret-mode kernels unroll into large while loops whose optimised CPU compile dominates
    test time (~3x slower than the whole run at level 0); the numerics are unaffected.
    """
    import jax

    compiled = jax.jit(fn).lower(*args).compile(compiler_options={"xla_backend_optimization_level": 0})
    return compiled(*args)
