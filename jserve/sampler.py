"""Sampler: logits -> one token per row (device, jitted separately from the model step).

Where it sits: ``step_fn`` returns ``logits: float32[R, V]``; the runner calls the function from
``make_sampler()`` with the step's ``SamplingBatch`` and static ``SamplerFlags``
(``jserve.sampling_batch``), and copies the ``SamplerOutput`` back to the host.

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
in sorted space from ``lax.top_k`` (stable: ties keep the lower token id first): top-k keeps
exactly k positions, top-p keeps the minimal prefix whose renormalised mass reaches top_p
(position j survives iff the mass before it is < top_p). Rows with 1 <= top_k <= SORT_CAP
always compute on the SORT_CAP largest logits, also in full-sort batches, so their tokens are
bitwise identical whichever sort width their batch needed; other filtered rows use a full sort.

Logprobs (vLLM's default "raw_logprobs" mode): log_softmax of the unprocessed logits, before
penalties, bans, temperature and filters; ``logprobs`` is the chosen token's entry.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax.extend.random import threefry2x32_p

from jserve.sampling_batch import SORT_CAP, SamplerFlags, SamplingBatch

_NEG_INF = float("-inf")


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class SamplerOutput:
    token_ids: jax.Array               # int32[R]
    logprobs: jax.Array                # float32[R]     raw logprob of token_ids
    top_ids: jax.Array | None          # int32[R, N]    N = flags.max_logprobs, None when 0
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


def apply_penalties(logits: jax.Array, batch: SamplingBatch) -> jax.Array:
    """vLLM's penalties. logits: f32[R, V]; uses batch.history_ids [R, H] / num_prompt [R].

    repetition (tokens in prompt or output): l > 0 -> l / rp, else l * rp;
    then l -= frequency * output_count + presence * (output_count > 0).
    """
    ids = batch.history_ids
    is_output = jnp.arange(ids.shape[1])[None, :] >= batch.num_prompt[:, None]
    seen = _scatter_rows(logits.shape, ids, jnp.ones(ids.shape, jnp.float32)) > 0
    out_counts = _scatter_rows(logits.shape, ids, is_output.astype(jnp.float32))
    rp = jnp.where(seen, batch.repetition_penalty[:, None], 1.0)
    logits = jnp.where(logits > 0, logits / rp, logits * rp)
    logits = logits - batch.frequency_penalty[:, None] * out_counts
    return logits - batch.presence_penalty[:, None] * (out_counts > 0).astype(jnp.float32)


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


def _sample_sorted(vals: jax.Array, idx: jax.Array, noise: jax.Array,
                   batch: SamplingBatch) -> jax.Array:
    """top-k -> top-p -> min-p -> Gumbel-max in sorted space.

    vals: f32[R, C] descending scaled logits, idx: int32[R, C] their token ids, noise: f32[R, V].
    Returns token ids int32[R].
    """
    c = vals.shape[1]
    pos = jnp.arange(c)[None, :]
    k = jnp.where(batch.top_k > 0, jnp.minimum(batch.top_k, c), c)[:, None]
    vals = jnp.where(pos < k, vals, _NEG_INF)
    rel = jnp.exp(vals - vals[:, :1])                       # p / p_max, 0 where masked
    probs = rel / jnp.sum(rel, axis=1, keepdims=True)
    before = jnp.concatenate([jnp.zeros_like(probs[:, :1]), jnp.cumsum(probs, axis=1)[:, :-1]], axis=1)
    top_p = batch.top_p[:, None]
    keep = ((before < top_p) | (top_p >= 1.0)) & (rel >= batch.min_p[:, None])
    score = jnp.where(keep, vals, _NEG_INF) + jnp.take_along_axis(noise, idx, axis=1)
    j = jnp.argmax(score, axis=1)
    return jnp.take_along_axis(idx, j[:, None], axis=1)[:, 0].astype(jnp.int32)


def _sample_random(logits: jax.Array, batch: SamplingBatch, flags: SamplerFlags) -> jax.Array:
    """Sampled-row tokens int32[R] from penalised logits f32[R, V] (greedy rows: don't care)."""
    r, v = logits.shape
    temp = jnp.where(batch.temperature > 0, batch.temperature, 1.0)
    scaled = logits / temp[:, None]
    noise = gumbel_noise(batch, v)
    if not flags.any_filters:
        return jnp.argmax(scaled + noise, axis=1).astype(jnp.int32)
    # min-p only (or no filter) rows: full vocabulary, value threshold.
    rel = jnp.exp(scaled - jnp.max(scaled, axis=1, keepdims=True))
    plain = jnp.argmax(jnp.where(rel >= batch.min_p[:, None], scaled, _NEG_INF) + noise, axis=1)
    cap = min(SORT_CAP, v)
    vals, idx = jax.lax.top_k(scaled, v if flags.full_sort else cap)
    capped = _sample_sorted(vals[:, :cap], idx[:, :cap], noise, batch)
    uses_sort = (batch.top_k > 0) | (batch.top_p < 1.0)
    tok = jnp.where(uses_sort, capped, plain.astype(jnp.int32))
    if flags.full_sort:
        full = _sample_sorted(vals, idx, noise, batch)
        in_cap = (batch.top_k >= 1) & (batch.top_k <= cap)
        tok = jnp.where(uses_sort & ~in_cap, full, tok)
    return tok


def _sample_core(logits: jax.Array, penalized: jax.Array | None, batch: SamplingBatch,
                 flags: SamplerFlags) -> SamplerOutput:
    """Everything after penalties. logits: f32[R, V] raw; penalized: f32[R, V] or None."""
    lp = raw_logprobs(logits)
    x = logits if penalized is None else penalized
    x = apply_bans(x, batch.banned_ids)
    tok = jnp.argmax(x, axis=1).astype(jnp.int32)
    if not flags.all_greedy:
        tok = jnp.where(batch.temperature > 0, _sample_random(x, batch, flags), tok)
    chosen = jnp.take_along_axis(lp, tok[:, None], axis=1)[:, 0]
    top_ids = top_lp = None
    if flags.max_logprobs > 0:
        top_lp, top_ids = jax.lax.top_k(lp, flags.max_logprobs)
        top_ids = top_ids.astype(jnp.int32)
    return SamplerOutput(token_ids=tok, logprobs=chosen, top_ids=top_ids, top_logprobs=top_lp)


def sample(logits: jax.Array, batch: SamplingBatch, flags: SamplerFlags) -> SamplerOutput:
    """One token per row, as a single traceable function (``Sampler`` runs it in two jits).

    logits: [R, V] any float dtype; batch: R rows; flags: static.
    """
    logits = logits.astype(jnp.float32)
    penalized = apply_penalties(logits, batch) if flags.any_penalties else None
    return _sample_core(logits, penalized, batch, flags)


class Sampler:
    """``sample`` as two jits, so the history width H does not multiply the sampler variants.

    ``penalize`` (compiled per (R, V, H)) runs only when ``flags.any_penalties``; ``core``
    (compiled per (R, V, flags with history_width dropped)) never sees the history arrays.
    Per row bucket that is #history buckets + 16 compiles instead of their product.
    ``traces`` counts how often each was traced (a compile-after-warm-up check).
    """

    def __init__(self) -> None:
        self.traces = {"penalize": 0, "core": 0}

        def penalize(logits: jax.Array, batch: SamplingBatch) -> jax.Array:
            self.traces["penalize"] += 1
            return apply_penalties(logits.astype(jnp.float32), batch)

        def core(logits: jax.Array, penalized: jax.Array | None, batch: SamplingBatch,
                 flags: SamplerFlags) -> SamplerOutput:
            self.traces["core"] += 1
            return _sample_core(logits.astype(jnp.float32), penalized, batch, flags)

        self._penalize = jax.jit(penalize)
        self._core = jax.jit(core, static_argnames=("flags",))

    def __call__(self, logits: jax.Array, batch: SamplingBatch, flags: SamplerFlags) -> SamplerOutput:
        """logits: [R, V]; batch: R rows (numpy or device arrays); flags: as from pack_sampling."""
        penalized = self._penalize(logits, batch) if flags.any_penalties else None
        slim = dataclasses.replace(batch, history_ids=None, num_prompt=None)
        return self._core(logits, penalized, slim, dataclasses.replace(flags, history_width=0))


def make_sampler() -> Sampler:
    """The runner's sampler: ``make_sampler()(logits, batch, flags) -> SamplerOutput``."""
    return Sampler()
