"""SamplingBatch: per-row sampling parameters as padded arrays; the reference packer.

Where it sits: the step executable samples from the packed step buffers
(``step_buffers.StepLayout.unpack`` builds its ``SamplingBatch`` there; penalties come from
the per-slot device state, ``jserve.penalty_state``, so its ``history_ids`` is None).
``pack_sampling`` packs host rows, one ``SamplingRow`` per row (``None`` for rows whose sampled
token is discarded), with the whole penalty history, for the pure reference sampler
(``sampler.sample``) that tests compare the engine with; ``SamplerFlags`` is its static
argument (and the step's: ``step_program.step_sampler_flags``)::

    rows: [SamplingRow | None] * n --pack_sampling--> SamplingBatch (R rows) + SamplerFlags
    row r >= n and None rows are padding: greedy, no penalties, no bans, no logprobs

Reproducibility: row r's random draw is a pure function of ``(seed, output_index)`` (see
``sampler.random_bits``); nothing about the batch (row position, size, other rows' params or
flags) enters it. Seeds are taken mod 2**64 and split into two uint32 words.

Static shapes: R (``num_rows_padded``) and V come from the caller; the banned-id width is
``MAX_BANNED_IDS``; the penalty history width H is a power-of-two bucket (>= 16) recorded in
``SamplerFlags.history_width`` (0 when no row uses penalties), so the flags plus (R, V) fix
every shape.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import jax
import numpy as np

from jserve.sampling_params import MAX_LOGPROBS, SamplingParams

# Width of the min_tokens ban list (eos + stop_token_ids). Requests needing more distinct ids
# while min_tokens is active make pack_sampling raise; the engine should reject them at
# admission (see ``banned_ids_fit``).
MAX_BANNED_IDS = 16
# Top-N logprob widths compiled: 0 when no row asked for logprobs, else the smallest bucket >=
# the largest N asked (logprobs=0 still needs the sampled token's logprob, so it maps to > 0).
# Two buckets keep the warm-up variant count down; top-20 costs about what top-1 does.
LOGPROBS_BUCKETS = (0, MAX_LOGPROBS)
MIN_HISTORY_WIDTH = 16


@dataclass(frozen=True)
class SamplerFlags:
    """Static (hashable) switches of the jitted sampler; one compiled variant per value.

    all_greedy:    every row is greedy (or padding): no noise, no filters.
    any_filters:   some sampled row uses top-k, top-p or min-p.
    history_width: H of ``SamplingBatch.history_ids``; 0 = no row uses penalties.
    max_logprobs:  N of the top-N logprob outputs (a LOGPROBS_BUCKETS value); 0 = no row
                   asked for logprobs (any row with logprobs >= 0 makes it > 0).
    branch_free:   no ``lax.cond``: the random draw and the logprobs are computed for every
                   batch, whether or not a row needs them (same values). On a GPU a conditional
                   reads its predicate on the host, so the thread launching the step waits
                   there for the device to finish the forward (RESULTS_v2_sessions_9-12.md, session 11).
                   Requires any_filters=False (the filters' full-sort fallback stays a branch).
    """

    all_greedy: bool = True
    any_filters: bool = False
    history_width: int = 0
    max_logprobs: int = 0
    branch_free: bool = False

    def __post_init__(self) -> None:
        for name in ("all_greedy", "any_filters", "branch_free"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"SamplerFlags.{name} must be a bool, got {getattr(self, name)!r}")
        if self.all_greedy and self.any_filters:
            raise ValueError("SamplerFlags.any_filters requires all_greedy=False (greedy ignores filters)")
        if self.branch_free and self.any_filters:
            raise ValueError("SamplerFlags.branch_free requires any_filters=False (the filters' "
                             "full-sort fallback is a run-time branch)")
        h = self.history_width
        if not isinstance(h, int) or (h != 0 and (h < MIN_HISTORY_WIDTH or h & (h - 1))):
            raise ValueError(f"SamplerFlags.history_width must be 0 or a power of two >= "
                             f"{MIN_HISTORY_WIDTH}, got {h!r}")
        if self.max_logprobs not in LOGPROBS_BUCKETS:
            raise ValueError(f"SamplerFlags.max_logprobs must be one of {LOGPROBS_BUCKETS}, "
                             f"got {self.max_logprobs!r}")

    @property
    def any_penalties(self) -> bool:
        return self.history_width > 0

    def covers(self, need: SamplerFlags) -> bool:
        """True when a batch needing ``need`` can run under these flags (same or more work)."""
        return ((need.all_greedy or not self.all_greedy)
                and (self.any_filters or not need.any_filters)
                and self.history_width >= need.history_width
                and self.max_logprobs >= need.max_logprobs)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class SamplingBatch:
    """Per-row sampling inputs, R = padded rows, K = MAX_BANNED_IDS, H = flags.history_width."""

    temperature: jax.Array         # float32[R]   0 = greedy (argmax)
    top_k: jax.Array               # int32[R]     0 = disabled (also when >= vocab)
    top_p: jax.Array               # float32[R]   1 = disabled
    min_p: jax.Array               # float32[R]   0 = disabled
    repetition_penalty: jax.Array  # float32[R]   1 = disabled
    presence_penalty: jax.Array    # float32[R]   0 = disabled
    frequency_penalty: jax.Array   # float32[R]   0 = disabled
    seed: jax.Array                # uint32[R, 2] (high word, low word) of seed mod 2**64
    output_index: jax.Array        # int32[R]     index of the output token being sampled
    banned_ids: jax.Array          # int32[R, K]  logits forced to -inf; -1 = unused slot
    history_ids: jax.Array | None  # int32[R, H]  prompt then output token ids; -1 = padding
    num_prompt: jax.Array | None   # int32[R]     history_ids[:, :num_prompt] is the prompt
    want_logprobs: jax.Array       # bool[R]      row asked for logprobs (top-N computed if any)
    # (history_ids / num_prompt are None in the step: penalties come from the device state.)

    @property
    def num_rows(self) -> int:
        return self.temperature.shape[0]


@dataclass
class SamplingRow:
    """One real row as the runner sees it (host objects; lists are read, never kept).

    ``output_index`` is the index of the token being sampled (= tokens generated so far);
    ``banned_ids`` are the ids to forbid this step (eos + stop_token_ids while
    num_output_tokens < min_tokens, empty otherwise).
    """

    params: SamplingParams
    seed: int
    output_index: int
    prompt_token_ids: Sequence[int] = ()
    output_token_ids: Sequence[int] = ()
    banned_ids: Sequence[int] = ()


def history_bucket(length: int) -> int:
    """Smallest power of two >= max(length, MIN_HISTORY_WIDTH)."""
    h = MIN_HISTORY_WIDTH
    while h < length:
        h *= 2
    return h


def logprobs_bucket(n: int | None) -> int:
    """None (no logprobs asked) -> 0; N >= 0 -> the smallest positive bucket >= N."""
    if n is None:
        return 0
    for b in LOGPROBS_BUCKETS[1:]:
        if n <= b:
            return b
    raise ValueError(f"logprobs={n} exceeds the maximum of {LOGPROBS_BUCKETS[-1]}")


def banned_ids_fit(params: SamplingParams, eos_token_ids: Sequence[int]) -> bool:
    """Admission check: can this request's min_tokens ban list fit the static width?"""
    if params.min_tokens == 0:
        return True
    ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_token_ids))
    return len(ids) <= MAX_BANNED_IDS


def _effective_top_k(p: SamplingParams, vocab_size: int) -> int:
    return 0 if p.top_k >= vocab_size else p.top_k


def required_flags(rows: Sequence[SamplingRow | None], vocab_size: int) -> SamplerFlags:
    """The cheapest flags under which ``rows`` sample correctly."""
    real = [r for r in rows if r is not None]
    sampled = [r.params for r in real if not r.params.greedy]
    any_filters = any(_effective_top_k(p, vocab_size) > 0 or p.top_p < 1.0 or p.min_p > 0.0
                      for p in sampled)
    pen = [len(r.prompt_token_ids) + len(r.output_token_ids) for r in real if r.params.uses_penalties]
    history = history_bucket(max(pen)) if pen else 0
    asked = [r.params.logprobs for r in real if r.params.logprobs is not None]
    return SamplerFlags(all_greedy=not sampled, any_filters=any_filters, history_width=history,
                        max_logprobs=logprobs_bucket(max(asked, default=None)))


def _check_ids(ids: np.ndarray, vocab_size: int, what: str, row: int) -> None:
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        bad = ids[(ids < 0) | (ids >= vocab_size)][0]
        raise ValueError(f"row {row}: {what} contains token id {int(bad)} outside [0, {vocab_size})")


def pack_sampling(rows: Sequence[SamplingRow | None], num_rows_padded: int, vocab_size: int, *,
                  flags: SamplerFlags | None = None) -> tuple[SamplingBatch, SamplerFlags]:
    """Pack rows into a ``SamplingBatch`` of ``num_rows_padded`` numpy rows + its flags.

    rows: one entry per real row (``None``: token discarded -> treated as padding).
    flags: force these flags (e.g. warm-up with ``rows=[]``); must cover what rows need.
    Raises ValueError on more rows than ``num_rows_padded``, ids outside the vocabulary,
    more than MAX_BANNED_IDS distinct banned ids in a row, or flags that do not cover rows.
    """
    if len(rows) > num_rows_padded:
        raise ValueError(f"{len(rows)} sampling rows exceed num_rows_padded={num_rows_padded}")
    need = required_flags(rows, vocab_size)
    if flags is None:
        flags = need
    elif not flags.covers(need):
        raise ValueError(f"forced {flags} does not cover what the rows need: {need}")
    R, H, K = num_rows_padded, flags.history_width, MAX_BANNED_IDS
    temperature = np.zeros(R, np.float32)
    top_k = np.zeros(R, np.int32)
    top_p = np.ones(R, np.float32)
    min_p = np.zeros(R, np.float32)
    rep = np.ones(R, np.float32)
    pres = np.zeros(R, np.float32)
    freq = np.zeros(R, np.float32)
    seed = np.zeros((R, 2), np.uint32)
    output_index = np.zeros(R, np.int32)
    banned = np.full((R, K), -1, np.int32)
    history = np.full((R, H), -1, np.int32)
    num_prompt = np.zeros(R, np.int32)
    want_logprobs = np.zeros(R, bool)
    for i, row in enumerate(rows):
        if row is None:
            continue
        p = row.params
        if not p.greedy:
            temperature[i] = p.temperature
            top_k[i] = _effective_top_k(p, vocab_size)
            top_p[i] = p.top_p
            min_p[i] = p.min_p
        if p.uses_penalties:
            rep[i], pres[i], freq[i] = p.repetition_penalty, p.presence_penalty, p.frequency_penalty
            prompt = np.asarray(row.prompt_token_ids, np.int32)
            output = np.asarray(row.output_token_ids, np.int32)
            _check_ids(prompt, vocab_size, "prompt_token_ids", i)
            _check_ids(output, vocab_size, "output_token_ids", i)
            history[i, :len(prompt)] = prompt
            history[i, len(prompt):len(prompt) + len(output)] = output
            num_prompt[i] = len(prompt)
        s = int(row.seed) % (1 << 64)
        seed[i] = (s >> 32, s & 0xFFFFFFFF)
        if row.output_index < 0:
            raise ValueError(f"row {i}: output_index must be >= 0, got {row.output_index}")
        output_index[i] = row.output_index
        want_logprobs[i] = p.logprobs is not None
        ban = np.unique(np.asarray(row.banned_ids, np.int32))
        if len(ban) > K:
            raise ValueError(f"row {i}: {len(ban)} distinct banned ids (eos + stop_token_ids for "
                             f"min_tokens) exceed MAX_BANNED_IDS={K}")
        _check_ids(ban, vocab_size, "banned_ids", i)
        banned[i, :len(ban)] = ban
    batch = SamplingBatch(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                          repetition_penalty=rep, presence_penalty=pres, frequency_penalty=freq,
                          seed=seed, output_index=output_index, banned_ids=banned,
                          history_ids=history, num_prompt=num_prompt,
                          want_logprobs=want_logprobs)
    return batch, flags
