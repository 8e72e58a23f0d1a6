"""Sampler + SamplingBatch packing (CPU): exactness against numpy references and invariances."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from jserve.sampler import SORT_CAP, apply_penalties, gumbel_noise, sample, top_k_rows
from jserve.sampling_batch import MAX_BANNED_IDS, SamplerFlags, SamplingRow, pack_sampling, required_flags
from jserve.sampling_params import SamplingParams

SAMPLER = jax.jit(sample, static_argnames=("flags",))
# CPU compiles dominate this file's time: tests share a few shapes and flag sets.
V_DRAW, N_DRAW = 32, 2048          # distribution tests: N_DRAW rows over a padded vocabulary
R_SMALL, V_SMALL = 8, 64
DRAW_FLAGS = SamplerFlags(all_greedy=False, any_filters=True)


def row(seed: int = 0, idx: int = 0, prompt=(), output=(), banned=(), **params) -> SamplingRow:
    return SamplingRow(SamplingParams(**params), seed, idx, list(prompt), list(output), tuple(banned))


def run(logits: np.ndarray, rows, num_rows: int | None = None, flags: SamplerFlags | None = None):
    logits = np.asarray(logits, np.float32)
    batch, f = pack_sampling(rows, num_rows or logits.shape[0], logits.shape[1], flags=flags)
    out = jax.tree.map(np.asarray, SAMPLER(logits, batch, f))
    return out, f, batch


def draws(logits_row, seed: int = 1, **params) -> np.ndarray:
    """N_DRAW tokens of one request at output indices 0..N_DRAW-1 (one row each).

    The vocabulary is padded to V_DRAW with -inf logits (never sampled) and the flags are
    forced to the filtered superset, so every distribution test reuses one compile.
    """
    padded = np.full(V_DRAW, -np.inf, np.float32)
    padded[:len(logits_row)] = logits_row
    logits = np.tile(padded, (N_DRAW, 1))
    out, _, _ = run(logits, [row(seed, i, **params) for i in range(N_DRAW)], flags=DRAW_FLAGS)
    return out.token_ids


def chi2(tokens: np.ndarray, probs: np.ndarray) -> float:
    obs = np.bincount(tokens, minlength=len(probs)).astype(np.float64)
    exp = probs * len(tokens)
    assert np.all(obs[exp == 0] == 0), "sampled a zero-probability token"
    m = exp > 0
    return float(np.sum((obs[m] - exp[m]) ** 2 / exp[m]))


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


# ---------------------------------------------------------------- numpy reference
def ref_penalties(x: np.ndarray, r: SamplingRow) -> np.ndarray:
    p = r.params
    x = x.astype(np.float32).copy()
    if not p.uses_penalties:
        return x
    seen = np.zeros(x.shape, bool)
    seen[list(r.prompt_token_ids) + list(r.output_token_ids)] = True
    counts = np.bincount(np.asarray(r.output_token_ids, int), minlength=x.shape[0]).astype(np.float32)
    rp = np.float32(p.repetition_penalty)
    x = np.where(seen, np.where(x > 0, x / rp, x * rp), x).astype(np.float32)
    x = x - np.float32(p.frequency_penalty) * counts
    return (x - np.float32(p.presence_penalty) * (counts > 0).astype(np.float32)).astype(np.float32)


def ref_token(logits_row: np.ndarray, r: SamplingRow, noise_row: np.ndarray) -> int:
    p = r.params
    x = ref_penalties(logits_row, r)
    x[list(r.banned_ids)] = -np.inf
    if p.greedy:
        return int(np.argmax(x))
    s = (x / np.float32(p.temperature)).astype(np.float32)
    order = np.argsort(-s, kind="stable")
    sv = s[order].copy()
    v = len(s)
    k = p.top_k if 0 < p.top_k < v else v
    sv[k:] = -np.inf
    rel = np.exp(sv.astype(np.float64) - sv[0])
    probs = rel / rel.sum()
    before = np.concatenate([[0.0], np.cumsum(probs)[:-1]])
    keep = ((before < p.top_p) | (p.top_p >= 1.0)) & (rel >= p.min_p)
    score = np.where(keep, sv, -np.inf).astype(np.float32) + noise_row[order]
    return int(order[np.argmax(score)])


# ---------------------------------------------------------------- tests
def test_greedy_is_first_argmax():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(R_SMALL, V_SMALL)).astype(np.float32)
    logits[0, 3] = logits[0, 7] = logits[0].max() + 1.0  # tie: first index wins
    rows = [row(seed=i, idx=i, temperature=0.0) for i in range(5)]
    # A sampled neighbour (plus penalties / logprobs elsewhere) changes the flags only.
    rows.append(row(seed=9, temperature=0.9, top_p=0.5, repetition_penalty=1.2, logprobs=1))
    out, flags, _ = run(logits, rows)
    assert not flags.all_greedy
    np.testing.assert_array_equal(out.token_ids[:5], np.argmax(logits[:5], axis=1))
    assert out.token_ids[0] == 3
    alone, flags, _ = run(logits, rows[:5])
    assert flags.all_greedy
    np.testing.assert_array_equal(alone.token_ids[:5], out.token_ids[:5])


def test_temperature_frequencies_match_softmax():
    logits = np.array([1.0, 0.2, -0.5, 2.0, 0.0, -1.0], np.float32)
    toks = draws(logits, temperature=0.7)
    # df = 5: P(chi2 > 25) ~ 1e-4; the fixed seed makes the outcome deterministic.
    assert chi2(toks, softmax(logits / 0.7)) < 25.0
    assert chi2(toks, softmax(logits)) > 100.0  # the test can tell temperatures apart


def test_top_k_stays_in_top_k():
    logits = np.random.default_rng(1).normal(size=20).astype(np.float32)
    toks = draws(logits, temperature=1.5, top_k=4)
    assert set(toks.tolist()) == set(np.argsort(-logits)[:4].tolist())


@pytest.mark.parametrize("params, nucleus", [
    (dict(top_p=0.75), [0, 1, 2]),           # 0.5 + 0.2 < 0.75 <= 0.5 + 0.2 + 0.15
    (dict(top_p=0.6), [0, 1]),
    (dict(top_p=0.45), [0]),
    (dict(top_p=0.55), [0, 1]),
    (dict(top_k=3, top_p=0.55), [0]),        # top-p on the renormalised top-3: 0.5 / 0.85 > 0.55
    (dict(min_p=0.25), [0, 1, 2]),           # p >= 0.25 * 0.5
    (dict(top_k=4, min_p=0.35), [0, 1]),
    (dict(top_k=2, min_p=0.25), [0, 1]),
])
def test_filters_keep_exact_set(params, nucleus):
    probs = np.array([0.5, 0.2, 0.15, 0.1, 0.05])
    perm = np.array([3, 0, 4, 1, 2])         # token perm[j] has probability probs[j]
    logits = np.zeros(5, np.float32)
    logits[perm] = np.log(probs)
    toks = draws(logits, temperature=1.0, **params)
    assert set(toks.tolist()) == set(perm[nucleus].tolist())
    expected = np.zeros(V_DRAW)
    expected[perm[nucleus]] = probs[nucleus] / probs[nucleus].sum()
    assert chi2(toks, expected) < 25.0


V_REF = 2048  # > SORT_CAP and large enough for top_k_rows to take its chunked path


def _random_rows(rng: np.random.Generator, n: int, v: int, full: bool) -> list[SamplingRow]:
    """Mixed rows; with ``full``, some need the full sort (top_k > SORT_CAP, flat top-p rows)."""
    rows = []
    for i in range(n):
        kind = i % 6
        kw: dict = dict(temperature=float(rng.uniform(0.3, 1.5)))
        if kind == 0:
            kw.update(top_k=int(rng.integers(1, SORT_CAP + 1)), top_p=float(rng.uniform(0.3, 1.0)))
        elif kind == 1:
            kw.update(top_k=int(rng.integers(1, SORT_CAP + 1)), min_p=float(rng.uniform(0, 0.2)))
        elif kind == 2:
            kw.update(min_p=float(rng.uniform(0, 0.3)))
        elif kind == 3:
            kw.update(top_p=float(rng.uniform(0.5, 0.99)), min_p=float(rng.uniform(0, 0.05)))
        elif kind == 4 and full:
            kw.update(top_k=int(rng.integers(SORT_CAP + 1, v)), top_p=float(rng.uniform(0.5, 1.0)))
        elif kind == 4:
            kw.update(temperature=0.0)
        out = rng.integers(0, v, size=int(rng.integers(0, 12))).tolist()
        if i % 3 == 0:
            kw.update(repetition_penalty=float(rng.uniform(0.8, 1.5)),
                      presence_penalty=float(rng.uniform(-1, 1)), frequency_penalty=float(rng.uniform(-1, 1)))
        banned = rng.integers(0, v, size=2).tolist() if i % 4 == 0 else ()
        rows.append(row(int(rng.integers(0, 2**40)), int(rng.integers(0, 1000)),
                        prompt=rng.integers(0, v, size=7).tolist(), output=out, banned=banned, **kw))
    return rows


def _ref_logits(rng: np.random.Generator, n: int, full: bool) -> np.ndarray:
    """Peaked rows (top-p nucleus inside the SORT_CAP largest); with ``full`` some flat ones."""
    scale = np.where(np.arange(n) // 2 % 2 == 0, 0.3, 8.0) if full else np.full(n, 8.0)
    return (rng.normal(size=(n, V_REF)) * scale[:, None]).astype(np.float32)


@pytest.mark.parametrize("chunk", [None, 2, 3, 16])
@pytest.mark.parametrize("k", [1, 7, 64])
def test_top_k_rows_equals_lax_top_k(k, chunk):
    rng = np.random.default_rng(k)
    x = rng.integers(-20, 20, size=(5, 1001)).astype(np.float32)   # many ties
    x[0, :900] = -np.inf
    x[1] = 0.0
    vals, idx = top_k_rows(jax.numpy.asarray(x), k, chunk)
    want_vals, want_idx = jax.lax.top_k(x, k)
    np.testing.assert_array_equal(np.asarray(vals), np.asarray(want_vals))
    np.testing.assert_array_equal(np.asarray(idx), np.asarray(want_idx))


@pytest.mark.parametrize("full", [False, True])
def test_tokens_match_numpy_reference(full):
    rng = np.random.default_rng(2 + full)
    logits = _ref_logits(rng, 48, full)
    rows = _random_rows(rng, 48, V_REF, full)
    out, flags, batch = run(logits, rows)
    assert flags.any_penalties and flags.any_filters
    noise = np.asarray(gumbel_noise(batch, V_REF))
    want = [ref_token(logits[i], r, noise[i]) for i, r in enumerate(rows)]
    np.testing.assert_array_equal(out.token_ids, want)


def test_rows_unchanged_when_batch_takes_full_sort():
    rng = np.random.default_rng(4)
    logits = _ref_logits(rng, 48, full=False)
    rows = _random_rows(rng, 48, V_REF, full=False)
    alone, _, _ = run(logits, rows)
    # Adding one row that needs the full sort switches the batch's branch, not these tokens.
    batched, _, _ = run(logits, rows[:-1] + [row(seed=1, temperature=1.0, top_k=SORT_CAP + 1)])
    np.testing.assert_array_equal(alone.token_ids[:-1], batched.token_ids[:-1])


def test_penalties_match_numpy():
    rng = np.random.default_rng(5)
    v = V_SMALL
    logits = (rng.normal(size=(R_SMALL, v)) * 2).astype(np.float32)
    rows = [row(prompt=[1, 2, 2, 9], output=[2, 3, 3, 3, 7], repetition_penalty=1.3,
                presence_penalty=0.5, frequency_penalty=0.7, temperature=0.0),
            row(prompt=[5], output=[], repetition_penalty=0.7, temperature=0.0),
            row(prompt=[0, 1], output=[1, 1, 39], presence_penalty=-1.5, frequency_penalty=2.0),
            row(prompt=[4, 4], output=[4], temperature=0.0)]  # no penalties: untouched
    batch, flags = pack_sampling(rows, R_SMALL, v)
    assert flags.history_width == 16
    got = np.asarray(apply_penalties(logits, batch))
    for i, r in enumerate(rows):
        np.testing.assert_allclose(got[i], ref_penalties(logits[i], r), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got[3], logits[3])
    out, _, _ = run(logits, rows)
    for i in (0, 1, 3):
        assert out.token_ids[i] == np.argmax(ref_penalties(logits[i], rows[i]))


def test_min_tokens_bans():
    logits = np.zeros((R_SMALL, V_SMALL), np.float32)
    logits[:, 2], logits[:, 5] = 10.0, 9.0    # eos = 2, stop id 5: both far above the rest
    greedy, _, _ = run(logits, [row(banned=[2, 5, 2], temperature=0.0), row(temperature=0.0)])
    assert greedy.token_ids[0] not in (2, 5) and greedy.token_ids[1] == 2
    toks = draws(logits[0, :10], temperature=1.0, banned=[5, 2])
    assert not set(toks.tolist()) & {2, 5}
    assert len(set(toks.tolist())) > 4
    with pytest.raises(ValueError, match="MAX_BANNED_IDS"):
        pack_sampling([row(banned=range(MAX_BANNED_IDS + 1))], 1, 100)
    with pytest.raises(ValueError, match="banned_ids"):
        pack_sampling([row(banned=[10])], 1, 10)


@pytest.mark.parametrize("params", [dict(temperature=0.9), dict(temperature=1.2, top_k=20, top_p=0.9)])
def test_same_seed_same_token_any_row_any_batch(params):
    rng = np.random.default_rng(6)
    v = V_SMALL
    target = rng.normal(size=v).astype(np.float32)
    others = [row(seed=1, temperature=0.0, logprobs=3),
              row(seed=2, temperature=0.8, top_p=0.5, repetition_penalty=1.2, prompt=[1, 2]),
              row(seed=3, temperature=0.5, min_p=0.1, banned=[4]),
              None]
    for t in range(0, 40, 3):
        alone, _, _ = run(target[None], [row(seed=77, idx=t, **params)])
        logits = rng.normal(size=(R_SMALL, v)).astype(np.float32)
        logits[5] = target
        rows = others + [row(seed=123, idx=t, **params), row(seed=77, idx=t, **params)]
        batched, flags, _ = run(logits, rows)
        assert flags.any_filters and flags.any_penalties and flags.max_logprobs > 0
        assert batched.token_ids[5] == alone.token_ids[0]


def test_different_seeds_differ():
    flat = np.zeros(V_DRAW, np.float32)
    logits = np.tile(flat, (N_DRAW, 1))
    out, _, _ = run(logits, [row(seed=s, idx=0) for s in range(N_DRAW)], flags=DRAW_FLAGS)
    assert chi2(out.token_ids, np.full(V_DRAW, 1 / V_DRAW)) < 70.0   # df = 31
    a = draws(flat, seed=5)
    b = draws(flat, seed=5 + 2**32)    # the high word of the seed matters too
    c = draws(flat, seed=5)
    assert (a == b).mean() < 0.1
    np.testing.assert_array_equal(a, c)


def test_logprobs_are_raw_log_softmax_and_sorted():
    rng = np.random.default_rng(7)
    v = V_SMALL
    logits = rng.normal(size=(R_SMALL, v)).astype(np.float32)
    rows = [row(temperature=0.0, logprobs=0, repetition_penalty=2.0, prompt=list(range(20))),
            row(seed=3, temperature=0.6, top_k=5, logprobs=5, banned=[int(np.argmax(logits[1]))]),
            row(seed=4, temperature=1.0)]
    out, flags, _ = run(logits, rows)
    assert flags.max_logprobs == 20
    lsm = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(out.logprobs, lsm[np.arange(R_SMALL), out.token_ids], rtol=1e-5, atol=1e-5)
    assert out.top_ids.shape == (R_SMALL, 20) and out.top_logprobs.shape == (R_SMALL, 20)
    np.testing.assert_array_equal(out.top_ids, np.argsort(-lsm, axis=1, kind="stable")[:, :20])
    np.testing.assert_allclose(out.top_logprobs, np.take_along_axis(lsm, out.top_ids, 1), atol=1e-5)
    assert np.all(np.diff(out.top_logprobs, axis=1) <= 0)
    none, flags, _ = run(logits, [row(temperature=0.0)])
    assert flags.max_logprobs == 0 and none.top_ids is None and none.top_logprobs is None


def test_padding_rows_produce_no_nan():
    v = V_SMALL
    logits = np.zeros((R_SMALL, v), np.float32)
    logits[0] = np.random.default_rng(8).normal(size=v)
    logits[5] = -np.inf
    logits[6] = 1e30
    logits[7] = -1e30
    rows = [row(seed=1, temperature=0.8, top_p=0.9, min_p=0.05, logprobs=2, presence_penalty=1.0,
                output=[1, 2], repetition_penalty=1.1)]
    out, _, _ = run(logits, rows)
    for leaf in (out.logprobs, out.top_logprobs):
        assert not np.isnan(leaf).any()
    assert np.all((out.token_ids >= 0) & (out.token_ids < v))


def test_no_retrace_when_only_values_change():
    traces = []

    def counted(logits, batch, flags):
        traces.append(flags)
        return sample(logits, batch, flags)

    sampler = jax.jit(counted, static_argnames=("flags",))
    rng = np.random.default_rng(9)
    v, seen = V_SMALL, set()
    for i in range(4):
        rows = [row(seed=int(rng.integers(0, 2**62)), idx=i * 7, temperature=float(rng.uniform(0.1, 2)),
                    top_k=int(rng.integers(1, 50)), top_p=float(rng.uniform(0.1, 1)), min_p=0.01 * i,
                    repetition_penalty=1.1 + i / 10, prompt=list(range(i + 1)), output=[i] * i,
                    banned=list(range(i)), logprobs=i),
                row(temperature=0.0)]
        batch, flags = pack_sampling(rows, R_SMALL, v)
        seen.add(flags)
        jax.block_until_ready(sampler(rng.normal(size=(R_SMALL, v)).astype(np.float32), batch, flags))
    assert len(seen) == 1 and len(traces) == 1


def test_required_flags_and_validation():
    v = V_REF
    need = lambda *ps: required_flags([row(**p) for p in ps], v)
    assert need(dict(temperature=0.0, top_p=0.5)) == SamplerFlags()
    assert need(dict()) == need(dict(top_k=v)) == SamplerFlags(all_greedy=False)  # top_k >= V: off
    for filtered in (dict(top_k=SORT_CAP + 1), dict(top_p=0.9), dict(min_p=0.1)):
        assert need(filtered, dict(temperature=0.0)) == SamplerFlags(False, True)
    assert need(dict(temperature=0.0, frequency_penalty=0.1, prompt=range(17))).history_width == 32
    assert need(dict(temperature=0.0, logprobs=0)).max_logprobs > 0
    assert SamplerFlags(False, True, 64, 20).covers(need(dict(top_k=3, logprobs=2, prompt=range(40),
                                                             presence_penalty=0.5)))
    with pytest.raises(ValueError, match="any_filters"):
        SamplerFlags(all_greedy=True, any_filters=True)
    with pytest.raises(ValueError, match="history_width"):
        SamplerFlags(history_width=24)
    with pytest.raises(ValueError, match="max_logprobs"):
        SamplerFlags(max_logprobs=3)
    with pytest.raises(ValueError, match="does not cover"):
        pack_sampling([row(top_p=0.5)], 2, v, flags=SamplerFlags(False, False))
    with pytest.raises(ValueError, match="exceed num_rows_padded"):
        pack_sampling([row(), row()], 1, v)
    with pytest.raises(ValueError, match="prompt_token_ids"):
        pack_sampling([row(prompt=[v], repetition_penalty=1.1)], 1, v)
    batch, flags = pack_sampling([], 4, v, flags=SamplerFlags(False, True, 64, 20))
    assert batch.history_ids.shape == (4, 64) and batch.num_rows == 4




def test_branch_free_flags_give_every_row_the_same_values():
    """The step's plain sampler (``branch_free``: the random draw and the logprobs for every
    batch, no lax.cond) gives each row what the run-time-branching sampler gives it."""
    rng = np.random.default_rng(11)
    base = SamplerFlags(all_greedy=False, any_filters=False, history_width=16, max_logprobs=20)
    free = dataclasses.replace(base, branch_free=True)
    batches = [
        [row(seed=1, temperature=0.0, logprobs=3),
         row(seed=2, idx=5, temperature=0.3, presence_penalty=1.5, prompt=[1, 2, 3], output=[4, 4]),
         row(seed=3, idx=4, temperature=1.1, banned=[5]), None,
         row(seed=4, temperature=0.6, repetition_penalty=1.5, output=[7, 7], logprobs=0)],
        [row(temperature=0.0), row(temperature=0.0, banned=[2])],   # no random row: cond skips the draw
        [row(seed=9, idx=3, temperature=0.7)],                      # no row asks for logprobs
    ]
    for rows in batches:
        logits = rng.normal(size=(R_SMALL, V_SMALL)).astype(np.float32)
        ref, _, _ = run(logits, rows, flags=base)
        got, _, _ = run(logits, rows, flags=free)
        np.testing.assert_array_equal(got.token_ids, ref.token_ids)
        want = [i for i, r in enumerate(rows) if r is not None and r.params.logprobs is not None]
        np.testing.assert_array_equal(got.logprobs[want], ref.logprobs[want])
        np.testing.assert_array_equal(got.top_ids[want], ref.top_ids[want])
    with pytest.raises(ValueError, match="branch_free requires any_filters=False"):
        SamplerFlags(all_greedy=False, any_filters=True, branch_free=True)
