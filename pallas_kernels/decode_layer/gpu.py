"""The fused decode layer on CUDA GPUs: one Llama-family decoder layer in one Pallas launch.

Where it sits: ``pallas_kernels.decode_layer`` dispatches here on GPU (not called by the
engine yet: ``api.py`` says why). Semantics are ``reference.py``'s.

Why: a small draft's decode is bound by kernel count, not bytes. Unfused, each layer is ~13
kernels (norms, QKV, RoPE, KV write, attention, o-proj, MLP, residuals), each a CUDA graph node
costing ~2.7 us of host launch (H200 census, ``benchmarks/RESULTS_v2_sessions_24-26.md``,
session 26), for a layer of 0.4 MiB of weights (``code-draft``). One program per row does the
whole layer, streaming the weights in tiles once per token. Measured (H200, session 27,
``benchmarks/decode_layer.py --sweep``): one code-draft layer for one row took 46-88 us at
context 0 over the launch configurations (4 warps best; 1 warp slowest) and 215-300 us at
context 1000, against ~25 us for the whole unfused layer: the chain of dependent tile loads and
reductions on one SM, and ~5 us per step of the serial page walk, are its cost (a faster design
would spread a layer over CTAs). This one::

    program r < R (row r; rows >= num_rows idle): its tokens t in [qsl[r], qsl[r + 1]) in turn:
      x chunks [CH] (H / CH of them, registers) -> RMSNorm -> h
      per kv head j:  q [G, d/2] x 2 halves, k [d/2] x 2, v [d] = sum over H chunks of
                      h_c[:, None] * W tile (broadcast-multiply-reduce: no tensor cores at one
                      token) -> RoPE on the halves (no in-register concatenation) -> k, v
                      stored at the token's slot -> online softmax over the row's pages below
                      its position (``ppb`` pages a step, gathered rows of the pool's
                      [N * ps, Nkv * d] view; keys at or past pos masked, their V zeroed: NaN
                      pages cannot leak) and the new key from registers -> o [G, d] -> o @ wo's
                      [G, d, CH] tiles into attn
      x1 = x + attn -> RMSNorm -> per I tile (a loop): gate, up -> silu(gate) * up ->
      added into the H / CH down-projection accumulators -> x + down stored
      a barrier: the token's K/V stores land before the next token of the row reads them
    program R: the tokens past the live rows' copy x

Triton lowering (not Mosaic GPU): the work is row gathers and reductions over tiles smaller
than a warpgroup's 64-row MMA, which Triton's pointer loads and reductions express directly.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.decode_layer.reference import NEG

F32 = jnp.float32


def _pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def chunk(n: int, widest: int = 64) -> int | None:
    """The tile width along a dimension of size n: the widest of ``widest``, 64 and 32 (at most
    ``widest``) dividing it, else None."""
    return next((c for c in (widest, 64, 32) if c <= widest and n % c == 0), None)


def unsupported(hidden: int, head_dim: int, group: int, intermediate: int, page_size: int,
                pool_dtype: jnp.dtype) -> str | None:
    """Why these shapes cannot run the kernel, or None when they can."""
    if chunk(hidden) is None or chunk(intermediate) is None:
        return f"hidden ({hidden}) and intermediate ({intermediate}) sizes must be multiples of 32"
    if head_dim % 2 or not _pow2(head_dim // 2) or head_dim < 16:
        return f"head_dim ({head_dim}) must be a power of two >= 16"
    if not _pow2(group) or not _pow2(page_size):
        return f"query heads per kv head ({group}) and page size ({page_size}) must be powers of two"
    if jnp.dtype(pool_dtype).itemsize == 1:
        return "quantized (1-byte) KV pools are not supported"
    return None


def pages_per_step(pages: int) -> int:
    """Pages gathered per attention step: the largest of 4, 2, 1 dividing the page-table width."""
    return next(n for n in (4, 2, 1) if pages % n == 0)


def _kernel(qsl_ref, pos_ref, slot_ref, nrows_ref, pt_ref, cos_ref, sin_ref, x_ref, ln1_ref,
            wqkv_ref, *rest, eps: float, sm_scale: float, has_bias: bool, nkv: int, group: int,
            page_size: int, ppb: int, layer: int, barriers: bool, widest: int):
    if has_bias:
        b_ref, *rest = rest
    wo_ref, ln2_ref, wgu_ref, wd_ref, k_in, v_in, x_out, k_out, v_out = rest
    del k_in, v_in   # aliased to k_out / v_out
    row, rows = pl.program_id(0), pl.num_programs(0) - 1
    hs, d = x_ref.shape[1], wqkv_ref.shape[3]
    inter = wd_ref.shape[1]
    half, ch, ni = d // 2, chunk(hs, widest), chunk(inter, widest)
    dt = x_ref.dtype
    hcols = [pl.ds(c * ch, ch) for c in range(hs // ch)]
    live_rows = jnp.minimum(nrows_ref[0], rows)
    end = qsl_ref[live_rows]

    def rnd(a):   # a rounding to the stream's dtype, as the unfused layer's ops do
        return a.astype(dt).astype(F32)

    def norm(xs, w_ref):
        ss = sum(jnp.sum(xc * xc) for xc in xs) / hs
        r = jax.lax.rsqrt(ss + eps)
        return [rnd(w_ref[layer, c].astype(F32) * rnd(xc * r)) for xc, c in zip(xs, hcols, strict=True)]

    @pl.when(row == rows)   # the extra program: tokens past the live rows' pass through
    def _padding():
        def copy(t, carry):
            for c in hcols:
                x_out[t, c] = x_ref[t, c]
            return carry

        jax.lax.fori_loop(end, x_ref.shape[0], copy, 0)

    def token(t, carry):   # the whole layer for token t of this row
        xs = [x_ref[t, c].astype(F32) for c in hcols]
        hv = norm(xs, ln1_ref)
        pos, slot = pos_ref[t], slot_ref[t]
        cos_lo, cos_hi = cos_ref[t, pl.ds(0, half)], cos_ref[t, pl.ds(half, half)]
        sin_lo, sin_hi = sin_ref[t, pl.ds(0, half)], sin_ref[t, pl.ds(half, half)]

        def proj(heads, cols):   # sum over H chunks of h_c * W[chunk, heads, cols] -> [.., cols]
            acc = None
            for hc, c in zip(hv, hcols, strict=True):
                w = wqkv_ref[layer, c, heads, cols].astype(F32)
                term = jnp.sum((hc[:, None, None] if w.ndim == 3 else hc[:, None]) * w, axis=0)
                acc = term if acc is None else acc + term
            if has_bias:
                acc = rnd(acc) + b_ref[layer, heads, cols].astype(F32)
            return rnd(acc)

        def rope(lo, hi):
            return rnd(lo * cos_lo - hi * sin_lo), rnd(hi * cos_hi + lo * sin_hi)

        attn = [jnp.zeros((ch,), F32) for _ in hcols]
        offs = jnp.arange(page_size, dtype=jnp.int32)
        bk = ppb * page_size
        for j in range(nkv):
            base = j * (group + 2)
            qs = pl.ds(base, group)
            ql, qh = rope(proj(qs, pl.ds(0, half)), proj(qs, pl.ds(half, half)))
            kl, kh = rope(proj(base + group, pl.ds(0, half)), proj(base + group, pl.ds(half, half)))
            vn = proj(base + group + 1, pl.ds(0, d))
            kl, kh = kl.astype(k_out.dtype), kh.astype(k_out.dtype)
            vn = vn.astype(v_out.dtype)
            k_out[slot, pl.ds(j * d, half)] = kl
            k_out[slot, pl.ds(j * d + half, half)] = kh
            v_out[slot, pl.ds(j * d, d)] = vn
            ql, qh = ql * sm_scale, qh * sm_scale

            def body(b, carry, j=j, ql=ql, qh=qh):
                acc, m, lsum = carry
                pages = pt_ref[row, pl.ds(b * ppb, ppb)]
                krow = (pages[:, None] * page_size + offs[None, :]).reshape(bk)
                k_lo = k_out[krow, pl.ds(j * d, half)].astype(F32)
                k_hi = k_out[krow, pl.ds(j * d + half, half)].astype(F32)
                v = v_out[krow, pl.ds(j * d, d)].astype(F32)
                ctx = b * bk + jnp.arange(bk, dtype=jnp.int32) < pos
                s = (jnp.sum(ql[:, None, :] * k_lo[None], axis=2)
                     + jnp.sum(qh[:, None, :] * k_hi[None], axis=2))          # [G, bk]
                s = jnp.where(ctx[None, :], s, NEG)
                m_new = jnp.maximum(m, jnp.max(s, axis=1))
                alpha = jnp.exp(m - m_new)
                p = jnp.where(ctx[None, :], jnp.exp(s - m_new[:, None]), 0.0)
                v = jnp.where(ctx[:, None], v, 0.0)
                acc = acc * alpha[:, None] + jnp.sum(p[:, :, None] * v[None], axis=1)
                return acc, m_new, lsum * alpha + jnp.sum(p, axis=1)

            init = (jnp.zeros((group, d), F32), jnp.full((group,), NEG, F32), jnp.zeros((group,), F32))
            acc, m, lsum = jax.lax.fori_loop(0, (pos + bk - 1) // bk, body, init)
            s_new = jnp.sum(ql * kl.astype(F32)[None], axis=1) + jnp.sum(qh * kh.astype(F32)[None], axis=1)
            m_new = jnp.maximum(m, s_new)
            alpha, p_new = jnp.exp(m - m_new), jnp.exp(s_new - m_new)
            acc = acc * alpha[:, None] + p_new[:, None] * vn.astype(F32)[None]
            o = rnd(acc / (lsum * alpha + p_new)[:, None])                        # [G, d]
            for n, c in enumerate(hcols):
                w = wo_ref[layer, pl.ds(j * group, group), :, c].astype(F32)       # [G, d, CH]
                attn[n] = attn[n] + jnp.sum(jnp.sum(o[:, :, None] * w, axis=1), axis=0)
        x1 = [rnd(xc + rnd(a)) for xc, a in zip(xs, attn, strict=True)]
        h2 = norm(x1, ln2_ref)

        def mlp(i, downs):
            cols = pl.ds(i * ni, ni)
            gate = up = None
            for hc, c in zip(h2, hcols, strict=True):
                tg = jnp.sum(hc[:, None] * wgu_ref[layer, c, 0, cols].astype(F32), axis=0)
                tu = jnp.sum(hc[:, None] * wgu_ref[layer, c, 1, cols].astype(F32), axis=0)
                gate, up = (tg, tu) if gate is None else (gate + tg, up + tu)
            gate, up = rnd(gate), rnd(up)
            act = rnd(rnd(gate / (1.0 + jnp.exp(-gate))) * up)
            return tuple(dn + jnp.sum(act[:, None] * wd_ref[layer, cols, c].astype(F32), axis=0)
                         for dn, c in zip(downs, hcols, strict=True))

        downs = jax.lax.fori_loop(0, inter // ni, mlp, tuple(jnp.zeros((ch,), F32) for _ in hcols))
        for xc, dn, c in zip(x1, downs, hcols, strict=True):
            x_out[t, c] = rnd(xc + rnd(dn)).astype(dt)
        if barriers:   # this token's K/V stores land before the next token's attention reads
            plgpu.debug_barrier()
        return carry

    @pl.when(row < live_rows)
    def _live():
        jax.lax.fori_loop(qsl_ref[row], qsl_ref[row + 1], token, 0)


def decode_layer(x: jax.Array, ln_attn: jax.Array, wqkv: jax.Array, bqkv: jax.Array | None,
                 wo: jax.Array, ln_mlp: jax.Array, wgu: jax.Array, wd: jax.Array,
                 cos: jax.Array, sin: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                 page_table: jax.Array, query_start_loc: jax.Array, positions: jax.Array,
                 slot_mapping: jax.Array, num_rows: jax.Array, *, layer: int, eps: float,
                 sm_scale: float, interpret: bool = False, num_warps: int = 4,
                 num_stages: int = 2, widest: int = 64) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Same contract as ``reference.decode_layer``; ValueError when ``unsupported``.
    ``num_warps``, ``num_stages``: Triton's; ``widest``: the widest weight tile (a power of two
    >= 32)."""
    hs = x.shape[1]
    nl, _, nkv, gp2, d = wqkv.shape
    group, inter = gp2 - 2, wgu.shape[3]
    n, ps = k_pages.shape[:2]
    why = unsupported(hs, d, group, inter, ps, k_pages.dtype)
    if why:
        raise ValueError(f"decode_layer: {why}")
    flat = (n * ps, nkv * d)
    args = [query_start_loc, positions, slot_mapping, num_rows, page_table, cos.astype(F32),
            sin.astype(F32), x,
            ln_attn, wqkv.reshape(nl, hs, nkv * gp2, d)]
    if bqkv is not None:
        args.append(bqkv.reshape(nl, nkv * gp2, d))
    args += [wo.reshape(nl, nkv * group, d, hs), ln_mlp, wgu, wd, k_pages.reshape(flat),
             v_pages.reshape(flat)]
    kernel = functools.partial(_kernel, eps=eps, sm_scale=sm_scale, has_bias=bqkv is not None,
                               nkv=nkv, group=group, page_size=ps,
                               ppb=pages_per_step(page_table.shape[1]), layer=layer,
                               barriers=not interpret, widest=widest)
    out, k2, v2 = pl.pallas_call(
        kernel,
        grid=(page_table.shape[0] + 1,),
        out_shape=(jax.ShapeDtypeStruct(x.shape, x.dtype),
                   jax.ShapeDtypeStruct(flat, k_pages.dtype), jax.ShapeDtypeStruct(flat, v_pages.dtype)),
        input_output_aliases={len(args) - 2: 1, len(args) - 1: 2},
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="decode_layer",
    )(*args)
    return out, k2.reshape(k_pages.shape), v2.reshape(v_pages.shape)
