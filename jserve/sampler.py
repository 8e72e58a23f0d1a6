"""Sampler: logits -> one token per row, traced inside the step executable.

Where it sits: ``step_program.fused_step`` runs ``_sample_core`` on the model's ``logits: float32[R, V]``
with the step's ``SamplingBatch`` and static ``SamplerFlags`` (``jserve.sampling_batch``); the
penalties there come from the per-slot device state (``jserve.penalty_state``), which calls
``penalize_counts``. ``sample`` (penalties from ``SamplingBatch.history_ids``) is the pure
reference of the whole pipeline that tests compare the engine with.

Per row, in vLLM's order::

    raw logits --log_softmax--> logprobs / top-N            (the model's raw distribution)
        |
    penalties: repetition (prompt + output ids), then frequency / presence (output counts)
    min_tokens bans -> -inf
        |-- greedy row (temperature 0): argmax, first index on ties
        `-- sampled row: / temperature -> top-k -> top-p -> min-p -> Gumbel-max
                         noise[token] = gumbel(threefry(seed; output_index, token))

Reproducibility: the noise of a row depends only on (seed, output_index, V) (``random_bits``:
a counter-based cipher, equivalent to folding output_index into a per-seed key), and every
operation is row-wise, so a seeded request draws the same tokens alone or batched, at any
row, under any flags.

Filters. min-p keeps p >= min_p * p_max, i.e. exp(l - l_max) >= min_p; it is order-free
(top-k/top-p never drop the maximum and renormalising keeps ratios to it). top-k/top-p work
in sorted order (value descending, ties -> lower token id first): top-k keeps exactly k
positions, top-p keeps the minimal prefix whose renormalised mass reaches top_p (position j
survives iff the mass before it is < top_p). They run on the SORT_CAP largest logits
(``top_k_rows``, exact and sort-free over V) whenever that is exact for the row; a full sort
runs under ``lax.cond`` only for rows it is not (see ``_sample_random``).

Logprobs (vLLM's default "raw_logprobs" mode): log_softmax of the unprocessed logits, before
penalties, bans, temperature and filters; ``logprobs`` is the chosen token's entry.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax.extend.random import threefry2x32_p

from jserve.sampling_batch import SamplerFlags, SamplingBatch

_NEG_INF = float("-inf")
# top-k/top-p run on the SORT_CAP largest logits of a row when that is exact (top_k <= cap, or
# a top-p nucleus inside them); other rows take a full sort (a runtime branch, not a flag).
SORT_CAP = 256


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class SamplerOutput:
    token_ids: jax.Array               # int32[R]
    logprobs: jax.Array                # float32[R]     raw logprob of token_ids
    top_ids: jax.Array | None          # int32[R, N]    N = min(flags.max_logprobs, V); None if 0
    top_logprobs: jax.Array | None     # float32[R, N]  sorted descending


def raw_logprobs(logits: jax.Array) -> jax.Array:
    """log_softmax over the vocabulary; a row of all -inf gives -inf (not NaN). [R, V] -> [R, V]."""
    m = jnp.max(logits, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    s = jnp.sum(jnp.exp(logits - m), axis=-1, keepdims=True)
    return logits - (m + jnp.log(jnp.where(s > 0, s, 1.0)))


def _scatter_rows(shape: tuple[int, int], ids: jax.Array, values: jax.Array) -> jax.Array:
    """Add ``values[r, j]`` at ``[r, ids[r, j]]``; ids < 0 (padding) are dropped. -> f32[R, V]."""
    rows = jnp.broadcast_to(jnp.arange(shape[0])[:, None], ids.shape)
    cols = jnp.where(ids >= 0, ids, shape[1])  # out of range -> dropped
    return jnp.zeros(shape, jnp.float32).at[rows, cols].add(values, mode="drop")


def penalize_counts(logits: jax.Array, seen: jax.Array, out_counts: jax.Array,
                    batch: SamplingBatch) -> jax.Array:
    """vLLM's penalties from per-row token statistics. logits: f32[R, V]; seen: bool[R, V]
    (token in the prompt or the output); out_counts: f32[R, V] (times emitted in the output).

    repetition (seen tokens): l > 0 -> l / rp, else l * rp;
    then l -= frequency * output_count + presence * (output_count > 0).
    A row with neutral parameters (rp 1, presence and frequency 0) is returned unchanged.
    """
    rp = jnp.where(seen, batch.repetition_penalty[:, None], 1.0)
    logits = jnp.where(logits > 0, logits / rp, logits * rp)
    logits = logits - batch.frequency_penalty[:, None] * out_counts
    return logits - batch.presence_penalty[:, None] * (out_counts > 0).astype(jnp.float32)


def apply_penalties(logits: jax.Array, batch: SamplingBatch) -> jax.Array:
    """``penalize_counts`` with the statistics taken from batch.history_ids [R, H] (prompt
    then output ids, -1 padding) and batch.num_prompt [R]. logits: f32[R, V]."""
    ids = batch.history_ids
    is_output = jnp.arange(ids.shape[1])[None, :] >= batch.num_prompt[:, None]
    seen = _scatter_rows(logits.shape, ids, jnp.ones(ids.shape, jnp.float32)) > 0
    out_counts = _scatter_rows(logits.shape, ids, is_output.astype(jnp.float32))
    return penalize_counts(logits, seen, out_counts, batch)


def apply_bans(logits: jax.Array, banned_ids: jax.Array) -> jax.Array:
    """Set ``logits[r, banned_ids[r, j]] = -inf`` (ids < 0 ignored). [R, V], [R, K] -> [R, V]."""
    rows = jnp.broadcast_to(jnp.arange(logits.shape[0])[:, None], banned_ids.shape)
    cols = jnp.where(banned_ids >= 0, banned_ids, logits.shape[1])
    return logits.at[rows, cols].set(_NEG_INF, mode="drop")


def random_bits(seed: jax.Array, output_index: jax.Array, vocab_size: int) -> jax.Array:
    """Counter-based random words uint32[R, V]: Threefry-2x32 keyed by the row's seed.

    seed: uint32[R, 2], output_index: int32[R]. Block j of row r is
    threefry(key=seed[r], counter=(output_index[r], j)); its two output words are the bits of
    tokens j and j + ceil(V / 2). One cipher call site (cheap to compile) and no state.
    """
    half = -(-vocab_size // 2)
    r = seed.shape[0]
    shape = (r, half)
    k0 = jnp.broadcast_to(seed[:, :1], shape)
    k1 = jnp.broadcast_to(seed[:, 1:], shape)
    c0 = jnp.broadcast_to(output_index.astype(jnp.uint32)[:, None], shape)
    c1 = jnp.broadcast_to(jnp.arange(half, dtype=jnp.uint32)[None, :], shape)
    lo, hi = threefry2x32_p.bind(k0, k1, c0, c1)
    return jnp.concatenate([lo, hi], axis=1)[:, :vocab_size]


def gumbel_noise(batch: SamplingBatch, vocab_size: int) -> jax.Array:
    """Gumbel(0, 1) noise f32[R, V]; row r depends only on (seed_r, output_index_r, V).

    u = (top 23 bits + 0.5) / 2**23 lies in [2**-24, 1 - 2**-24] exactly, so the noise
    -log(-log u) is finite (within [-2.9, 16.7]).
    """
    bits = random_bits(batch.seed, batch.output_index, vocab_size)
    u = ((bits >> 9).astype(jnp.float32) + 0.5) * (1.0 / (1 << 23))
    return -jnp.log(-jnp.log(u))


def _chunk_size(vocab_size: int, k: int) -> int:
    """Chunk length for ``top_k_rows``: balances #chunks and k * chunk candidates (~sqrt(V/k))."""
    c = 1
    while (2 * c) ** 2 * k <= vocab_size:
        c *= 2
    return c


def top_k_rows(x: jax.Array, k: int, chunk: int | None = None) -> tuple[jax.Array, jax.Array]:
    """Exactly ``lax.top_k(x, k)`` (descending, ties -> lower index first) without sorting V.

    x: f32[R, V] -> (values f32[R, k], indices int32[R, k]). Cut each row into chunks of
    ``chunk``; keep the k chunks with the largest maxima (stable); top-k their k * chunk
    elements. Exact: an element of a dropped chunk c is preceded, in (value desc, index asc)
    order, by the maximum of each of the k kept chunks (each has a larger max, or an equal
    max and lower indices), so it is not in the top k. GPUs sort for large k; this sorts
    ~V/chunk + k*chunk elements instead of V.
    """
    r, v = x.shape
    chunk = _chunk_size(v, k) if chunk is None else chunk
    n = -(-v // chunk)
    if chunk < 2 or n <= k:
        return jax.lax.top_k(x, k)
    xp = jnp.pad(x, ((0, 0), (0, n * chunk - v)), constant_values=_NEG_INF).reshape(r, n, chunk)
    _, kept = jax.lax.top_k(jnp.max(xp, axis=2), k)
    kept = jnp.sort(kept, axis=1)                   # candidates stay in token order (stable ties)
    cand = jnp.take_along_axis(xp, kept[:, :, None], axis=1).reshape(r, k * chunk)
    vals, j = jax.lax.top_k(cand, k)
    return vals, jnp.take_along_axis(kept, j // chunk, axis=1) * chunk + j % chunk


def _sample_sorted(vals: jax.Array, idx: jax.Array, noise: jax.Array, batch: SamplingBatch,
                   total: jax.Array) -> tuple[jax.Array, jax.Array]:
    """top-k -> top-p -> min-p -> Gumbel-max on the C largest scaled logits of each row.

    vals: f32[R, C] descending, idx: int32[R, C] their token ids, noise: f32[R, V],
    total: f32[R] sum over the whole vocabulary of exp(scaled - max), the top-p normaliser of
    rows without top-k (rows with top-k normalise over their k survivors, all within C).
    Returns (token ids int32[R], mass f32[R] of the C positions under that normalisation).
    """
    keep, mass = sorted_keep(vals, batch, total)
    score = jnp.where(keep, vals, _NEG_INF) + jnp.take_along_axis(noise, idx, axis=1)
    j = jnp.argmax(score, axis=1)
    return jnp.take_along_axis(idx, j[:, None], axis=1)[:, 0].astype(jnp.int32), mass


def sorted_keep(vals: jax.Array, batch: SamplingBatch, total: jax.Array
                ) -> tuple[jax.Array, jax.Array]:
    """The top-k -> top-p -> min-p survivors among the C largest scaled logits of each row.

    vals: f32[R, C] descending; total: f32[R] (see ``_sample_sorted``) -> (keep bool[R, C],
    mass f32[R] of the C positions). Shared with the rejection sampler (``jserve.spec``),
    which needs the same filtered distribution as an explicit mask."""
    c = vals.shape[1]
    pos = jnp.arange(c)[None, :]
    k = jnp.where(batch.top_k > 0, jnp.minimum(batch.top_k, c), c)[:, None]
    vals = jnp.where(pos < k, vals, _NEG_INF)
    rel = jnp.exp(vals - vals[:, :1])                       # p / p_max, 0 where masked
    norm = jnp.where(batch.top_k > 0, jnp.sum(rel, axis=1), total)[:, None]
    probs = rel / norm
    cum = jnp.cumsum(probs, axis=1)
    before = jnp.concatenate([jnp.zeros_like(probs[:, :1]), cum[:, :-1]], axis=1)
    top_p = batch.top_p[:, None]
    keep = ((before < top_p) | (top_p >= 1.0)) & (rel >= batch.min_p[:, None]) & (pos < k)
    return keep, cum[:, -1]


def _sample_random(logits: jax.Array, batch: SamplingBatch, flags: SamplerFlags) -> jax.Array:
    """Sampled-row tokens int32[R] from penalised logits f32[R, V] (greedy rows: don't care).

    Filtered rows (top-k or top-p) use the SORT_CAP largest logits when that is exact: top_k in
    [1, SORT_CAP], or top-p whose nucleus ends inside them (their mass >= top_p). Only when some
    row needs more (top_k > SORT_CAP, or a flat distribution under top-p) does a lax.cond run a
    full-vocabulary sort, and only those rows take its result, so every row's token is the same
    whichever branch its batch took.
    """
    r, v = logits.shape
    temp = jnp.where(batch.temperature > 0, batch.temperature, 1.0)
    scaled = logits / temp[:, None]
    noise = gumbel_noise(batch, v)
    if not flags.any_filters:
        return jnp.argmax(scaled + noise, axis=1).astype(jnp.int32)
    uses_filter = (batch.top_k > 0) | (batch.top_p < 1.0) | (batch.min_p > 0)
    plain_tok = jnp.argmax(scaled + noise, axis=1).astype(jnp.int32)
    return jax.lax.cond(jnp.any(uses_filter & (batch.temperature > 0)),
                        lambda: _sample_filtered(scaled, noise, batch), lambda: plain_tok)


def _sample_filtered(scaled: jax.Array, noise: jax.Array, batch: SamplingBatch) -> jax.Array:
    """top-k / top-p / min-p rows (and plain rows alongside them): tokens int32[R]."""
    v = scaled.shape[1]
    # Rows with min-p only (or nothing): the whole vocabulary with a value threshold.
    rel = jnp.exp(scaled - jnp.max(scaled, axis=1, keepdims=True))
    total = jnp.sum(rel, axis=1)
    plain = jnp.argmax(jnp.where(rel >= batch.min_p[:, None], scaled, _NEG_INF) + noise, axis=1)
    cap = min(SORT_CAP, v)
    vals, idx = top_k_rows(scaled, cap)
    capped, cap_mass = _sample_sorted(vals, idx, noise, batch, total)
    uses_sort = (batch.top_k > 0) | (batch.top_p < 1.0)
    tok = jnp.where(uses_sort, capped, plain.astype(jnp.int32))
    in_cap = (batch.top_k >= 1) & (batch.top_k <= cap)
    needs_full = uses_sort & ~in_cap & ((batch.top_k > 0) | (cap_mass < batch.top_p))

    def full_sort(tok: jax.Array) -> jax.Array:
        vals, idx = jax.lax.top_k(scaled, v)
        return _sample_sorted(vals, idx, noise, batch, total)[0]

    full = jax.lax.cond(jnp.any(needs_full), full_sort, lambda tok: tok, tok)
    return jnp.where(needs_full, full, tok)


def _sample_core(logits: jax.Array, penalized: jax.Array | None, batch: SamplingBatch,
                 flags: SamplerFlags) -> SamplerOutput:
    """Everything after penalties. logits: f32[R, V] raw; penalized: f32[R, V] or None.

    Work the batch does not need is skipped at run time: the random path only when some row
    samples, the top-N logprobs only when some row asked (``lax.cond`` on the batch values),
    so one compiled superset variant serves every batch at little cost. ``flags.branch_free``
    computes both for every batch instead (the same values, no conditional).
    """
    x = logits if penalized is None else penalized
    x = apply_bans(x, batch.banned_ids)
    greedy = jnp.argmax(x, axis=1).astype(jnp.int32)
    tok = greedy
    if not flags.all_greedy:
        sampled = (_sample_random(x, batch, flags) if flags.branch_free else
                   jax.lax.cond(jnp.any(batch.temperature > 0),
                                lambda: _sample_random(x, batch, flags), lambda: greedy))
        tok = jnp.where(batch.temperature > 0, sampled, greedy)
    r = logits.shape[0]
    if flags.max_logprobs == 0:
        lp = raw_logprobs(logits)
        chosen = jnp.take_along_axis(lp, tok[:, None], axis=1)[:, 0]
        return SamplerOutput(token_ids=tok, logprobs=chosen, top_ids=None, top_logprobs=None)
    n = min(flags.max_logprobs, logits.shape[1])

    def with_logprobs() -> tuple[jax.Array, jax.Array, jax.Array]:
        lp = raw_logprobs(logits)
        chosen = jnp.take_along_axis(lp, tok[:, None], axis=1)[:, 0]
        top_lp, top_ids = top_k_rows(lp, n)
        return chosen, top_ids.astype(jnp.int32), top_lp

    def without() -> tuple[jax.Array, jax.Array, jax.Array]:
        return (jnp.zeros((r,), jnp.float32), jnp.zeros((r, n), jnp.int32),
                jnp.zeros((r, n), jnp.float32))

    chosen, top_ids, top_lp = (with_logprobs() if flags.branch_free else
                               jax.lax.cond(jnp.any(batch.want_logprobs), with_logprobs, without))
    return SamplerOutput(token_ids=tok, logprobs=chosen, top_ids=top_ids, top_logprobs=top_lp)


def sample(logits: jax.Array, batch: SamplingBatch, flags: SamplerFlags) -> SamplerOutput:
    """One token per row, as a single traceable function: the reference of the step's sampler.

    logits: [R, V] any float dtype; batch: R rows (penalties from its history); flags: static.
    """
    logits = logits.astype(jnp.float32)
    penalized = apply_penalties(logits, batch) if flags.any_penalties else None
    return _sample_core(logits, penalized, batch, flags)
