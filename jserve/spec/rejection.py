"""Exact rejection sampling of draft tokens (Leviathan et al. 2023; Chen et al. 2023), in jit.

Where it sits: inside the speculative step executable (``jserve.spec.verify_step``), after the
target model produced logits at each of a request row's 1 + k query positions. Pure jnp.

Per row r with ``num_draft[r] = k`` draft tokens d_0..d_{k-1} and target logits at positions
0..K (K = the static draft width; positions past k are ignored)::

    target p_j  = the ordinary sampler's distribution at position j: raw logits -> penalties
                  and bans (done by the caller) -> / temperature -> top-k -> top-p -> min-p
    greedy row  accept d_j while d_j == argmax p_j; emit the argmax at the first mismatch,
                or the bonus argmax at position k when every draft matched
    random row  accept d_j with probability min(1, p_j(d_j) / q_j(d_j)); at the first
                rejection emit a sample of norm(max(p_j - q_j, 0)) and stop; when all k
                are accepted emit a bonus sample of p_k
    n-gram drafts are point masses: q_j = onehot(d_j), so acceptance is p_j(d_j) and the
    resample is p_j with d_j removed

Randomness is counter-based, as in ``jserve.sampler``: position j of a row draws with the
row's seed at output index ``output_index + j`` (Gumbel noise over the vocabulary for the
samples, one more Threefry block for the acceptance uniform), so a seeded request gives the
same tokens alone or batched, and a row without drafts samples exactly what the ordinary
sampler samples.

Output: ``tokens int32[R, K + 1]`` (row r's first ``num_emitted[r]`` entries are its new
tokens: the accepted drafts then one corrected / bonus token) and ``num_emitted int32[R]``
(1 + accepted drafts).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.extend.random import threefry2x32_p

from jserve.sampler import SORT_CAP, gumbel_noise, sorted_keep, top_k_rows
from jserve.sampling_batch import SamplingBatch

_NEG_INF = float("-inf")
# The acceptance uniform of (seed, output_index) is Threefry block (output_index, UNIFORM_BLOCK):
# the Gumbel noise of the same counter uses blocks 0 .. ceil(V / 2) - 1, far below it.
UNIFORM_BLOCK = 0xFFFFFFFF


def expand_rows(batch: SamplingBatch, width: int) -> SamplingBatch:
    """Repeat each of R rows ``width`` times (row-major): position j of row r becomes virtual
    row r * width + j, sampling output index ``output_index[r] + j``. -> R * width rows."""
    def rep(a: jax.Array | None) -> jax.Array | None:
        return None if a is None else jnp.repeat(a, width, axis=0)

    out = {f.name: rep(getattr(batch, f.name)) for f in dataclasses.fields(batch)}
    offs = jnp.tile(jnp.arange(width, dtype=jnp.int32), batch.num_rows)
    out["output_index"] = out["output_index"] + offs
    return SamplingBatch(**out)


def uniforms(batch: SamplingBatch) -> jax.Array:
    """One uniform in (0, 1) per row: f32[R], a function of (seed, output_index) only."""
    k0, k1 = batch.seed[:, 0], batch.seed[:, 1]
    c0 = batch.output_index.astype(jnp.uint32)
    c1 = jnp.full_like(c0, UNIFORM_BLOCK)
    lo, _ = threefry2x32_p.bind(k0, k1, c0, c1)
    return ((lo >> 8).astype(jnp.float32) + 0.5) * (1.0 / (1 << 24))


def filter_mask(scaled: jax.Array, batch: SamplingBatch) -> jax.Array:
    """bool[N, V]: the tokens top-k -> top-p -> min-p keep, exactly the ordinary sampler's
    survivors (``sampler._sample_filtered``): the SORT_CAP largest logits when that is exact,
    a full sort (under ``lax.cond``) only for rows that need it. scaled: f32[N, V]."""
    n, v = scaled.shape
    rel = jnp.exp(scaled - jnp.max(scaled, axis=1, keepdims=True))
    total = jnp.sum(rel, axis=1)
    minp_keep = rel >= batch.min_p[:, None]
    rows = jnp.arange(n)[:, None]

    def sorted_mask(vals: jax.Array, idx: jax.Array) -> tuple[jax.Array, jax.Array]:
        keep, mass = sorted_keep(vals, batch, total)
        return jnp.zeros((n, v), bool).at[rows, idx].set(keep), mass

    cap = min(SORT_CAP, v)
    capped, cap_mass = sorted_mask(*top_k_rows(scaled, cap))
    uses_sort = (batch.top_k > 0) | (batch.top_p < 1.0)
    in_cap = (batch.top_k >= 1) & (batch.top_k <= cap)
    needs_full = uses_sort & ~in_cap & ((batch.top_k > 0) | (cap_mass < batch.top_p))
    full = jax.lax.cond(jnp.any(needs_full), lambda: sorted_mask(*jax.lax.top_k(scaled, v))[0],
                        lambda: capped)
    sorted_keep_ = jnp.where(needs_full[:, None], full, capped)
    return jnp.where(uses_sort[:, None], sorted_keep_, minp_keep)


def filtered_logits(x: jax.Array, batch: SamplingBatch, any_filters: bool = True) -> jax.Array:
    """The random rows' sampling transforms of the ordinary sampler: logits f32[N, V]
    (penalised, banned) / temperature, then top-k -> top-p -> min-p survivors, others -inf
    -> f32[N, V]. softmax of it is the distribution the sampler draws from (Gumbel-max over
    it); the draft model's sampled drafts use it too (``jserve.spec.draft``)."""
    n, v = x.shape
    temp = jnp.where(batch.temperature > 0, batch.temperature, 1.0)
    scaled = x / temp[:, None]
    if not any_filters:
        return scaled
    uses = (batch.top_k > 0) | (batch.top_p < 1.0) | (batch.min_p > 0)
    keep = jax.lax.cond(jnp.any(uses & (batch.temperature > 0)),
                        lambda: filter_mask(scaled, batch), lambda: jnp.ones((n, v), bool))
    return jnp.where(keep, scaled, _NEG_INF)


def softmax_rows(masked: jax.Array) -> jax.Array:
    """softmax over the vocabulary of f32[N, V] logits that may hold -inf -> f32[N, V]."""
    m = jnp.max(masked, axis=1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.exp(masked - m)
    return e / jnp.sum(e, axis=1, keepdims=True)


def _random_parts(x: jax.Array, vbatch: SamplingBatch, drafts_v: jax.Array,
                  draft_probs_v: jax.Array | None, any_filters: bool
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per virtual row (N = R * (K + 1)): (plain sample int32[N], resample after rejecting the
    row's draft int32[N], accept bool[N]). x: f32[N, V] penalised + banned logits;
    drafts_v: int32[N] (the draft at that position; anything where there is none)."""
    n, v = x.shape
    masked = filtered_logits(x, vbatch, any_filters)
    noise = gumbel_noise(vbatch, v)
    plain = jnp.argmax(masked + noise, axis=1).astype(jnp.int32)
    p = softmax_rows(masked)                                            # target probs [N, V]
    d = jnp.clip(drafts_v, 0, v - 1)[:, None]
    p_d = jnp.take_along_axis(p, d, axis=1)[:, 0]
    u = uniforms(vbatch)
    if draft_probs_v is None:                                           # point mass at d
        accept = u < p_d
        tok = jnp.arange(v)[None, :]
        resample = jnp.argmax(jnp.where(tok == d, _NEG_INF, masked) + noise, axis=1)
    else:
        q_d = jnp.take_along_axis(draft_probs_v, d, axis=1)[:, 0]
        accept = u * q_d < p_d
        w = jnp.maximum(p - draft_probs_v, 0.0)
        logw = jnp.where(w > 0, jnp.log(jnp.where(w > 0, w, 1.0)), _NEG_INF)
        # p == q to the last bit leaves no residual (and no rejection, but for rounding): p
        logw = jnp.where(jnp.any(w > 0, axis=1, keepdims=True), logw, masked)
        resample = jnp.argmax(logw + noise, axis=1)
    return plain, resample.astype(jnp.int32), accept


def rejection_sample(logits: jax.Array, draft_ids: jax.Array, num_draft: jax.Array,
                     batch: SamplingBatch, *, all_greedy: bool, any_filters: bool = True,
                     draft_probs: jax.Array | None = None, draft_slot: jax.Array | None = None
                     ) -> tuple[jax.Array, jax.Array]:
    """Verify drafts against the target. logits: f32[R, K + 1, V] (penalties and bans already
    applied, as the ordinary sampler would before temperature); draft_ids: int32[R, K];
    num_draft: int32[R] in [0, K]; batch: R rows (their output_index is position 0's);
    draft_probs: f32[R, K, V] the draft distributions, or None for point masses (n-gram); with
    ``draft_slot`` int32[R] a table f32[S, K, V] whose row draft_slot[r] is row r's (gathered
    only on the random path).
    ``all_greedy`` (static): every row is greedy, no random path is traced; ``any_filters``
    (static): some row may use top-k / top-p / min-p.
    -> (tokens int32[R, K + 1], num_emitted int32[R]) as in the module docstring."""
    r, k1, v = logits.shape
    k = k1 - 1
    x = logits.reshape(r * k1, v)
    target = jnp.argmax(x, axis=1).astype(jnp.int32).reshape(r, k1)     # greedy choice
    pos = jnp.arange(k)[None, :]
    valid = pos < num_draft[:, None]                                     # [R, K]
    accept_g = (draft_ids == target[:, :k]) & valid
    if all_greedy:
        accept, plain, resample = accept_g, target, target
    else:
        vbatch = expand_rows(batch, k1)
        drafts_v = jnp.concatenate([draft_ids, jnp.zeros((r, 1), jnp.int32)], axis=1).reshape(-1)

        def random() -> tuple[jax.Array, jax.Array, jax.Array]:
            dp = None
            if draft_probs is not None:
                q = draft_probs if draft_slot is None else draft_probs[draft_slot]
                dp = jnp.concatenate([q, jnp.zeros((r, 1, v), q.dtype)], axis=1).reshape(r * k1, v)
            return _random_parts(x, vbatch, drafts_v, dp, any_filters)

        plain_v, res_v, acc_v = jax.lax.cond(
            jnp.any(batch.temperature > 0), random,
            lambda: (target.reshape(-1), target.reshape(-1), jnp.zeros((r * k1,), bool)))
        rand = (batch.temperature > 0)[:, None]
        plain = jnp.where(rand, plain_v.reshape(r, k1), target)
        resample = jnp.where(rand, res_v.reshape(r, k1), target)
        accept = jnp.where(rand, acc_v.reshape(r, k1)[:, :k] & valid, accept_g)
    n_acc = jnp.sum(jnp.cumprod(accept.astype(jnp.int32), axis=1), axis=1)  # leading accepts
    at = n_acc[:, None]
    last = jnp.where(n_acc < num_draft, jnp.take_along_axis(resample, at, axis=1)[:, 0],
                     jnp.take_along_axis(plain, at, axis=1)[:, 0])
    padded = jnp.concatenate([draft_ids, jnp.zeros((r, 1), jnp.int32)], axis=1)
    cols = jnp.arange(k1)[None, :]
    tokens = jnp.where(cols < at, padded, jnp.where(cols == at, last[:, None], 0))
    return tokens.astype(jnp.int32), (n_acc + 1).astype(jnp.int32)
