"""The rejection sampler (jserve.spec.rejection): exact for greedy rows, distribution-preserving
for random rows (samples follow the target, not the draft), seeded rows reproducible, and a
row without drafts samples exactly what the ordinary sampler samples."""

from __future__ import annotations

import jax
import numpy as np
from sampling_laws import l2, softmax
from sampling_laws import top_p as top_p_law

from jserve.sampler import sample
from jserve.sampling_batch import SamplerFlags, SamplingRow, pack_sampling
from jserve.sampling_params import SamplingParams
from jserve.spec.rejection import rejection_sample

V, K = 8, 2                 # small vocabulary, two draft positions (three target positions)
N = 6000                    # samples (one row each, distinct seeds): one compile per shape
FLAGS = SamplerFlags(all_greedy=False, any_filters=True)

VERIFY = jax.jit(rejection_sample, static_argnames=("all_greedy", "any_filters"))


def _batch(rows, vocab=V):
    batch, _ = pack_sampling(rows, len(rows), vocab, flags=FLAGS)
    return batch


def _run_random(target_logits, q, top_p=1.0, point_mass=False, seed0=0):
    """N rows, each verifying drafts drawn from q (or fixed point-mass drafts) against the
    same target logits[K + 1, V]. -> (tokens [N, K + 1], num_emitted [N])."""
    rng = np.random.default_rng(seed0)
    if point_mass:
        drafts = np.tile(q[:K].argmax(axis=1), (N, 1))
    else:
        drafts = np.stack([rng.choice(V, size=N, p=q[j]) for j in range(K)], axis=1)
    rows = [SamplingRow(SamplingParams(temperature=1.0, top_p=top_p), seed0 * N + i, 0)
            for i in range(N)]
    logits = np.tile(target_logits[None], (N, 1, 1)).astype(np.float32)
    probs = None if point_mass else np.tile(q[None, :K], (N, 1, 1)).astype(np.float32)
    tok, n = VERIFY(logits, drafts.astype(np.int32), np.full(N, K, np.int32), _batch(rows),
                    all_greedy=False, draft_probs=probs)
    return np.asarray(tok), np.asarray(n)


def _dists(seed):
    rng = np.random.default_rng(seed)
    target = rng.normal(0, 1.5, (K + 1, V)).astype(np.float32)
    q = softmax(rng.normal(0, 1.5, (K + 1, V)))
    return target, q


def test_samples_follow_the_target_not_the_draft():
    target, q = _dists(1)
    for top_p in (1.0, 0.8):
        p = np.stack([top_p_law(softmax(target[j]), top_p) for j in range(K + 1)])
        tok, n = _run_random(target, q, top_p=top_p)
        # position 0 always emits; position 1 emits when draft 0 was accepted
        d0_t, d0_q = l2(tok[:, 0], p[0]), l2(tok[:, 0], q[0])
        second = tok[n >= 2, 1]
        d1_t, d1_q = l2(second, p[1]), l2(second, q[1])
        assert d0_t < 0.03 and d1_t < 0.05, (top_p, d0_t, d1_t)
        assert d0_q > 4 * d0_t and d1_q > 4 * d1_t, (top_p, d0_q, d1_q)
        # the distance to the target shrinks with the sample count (it is the target's law)
        assert l2(tok[:N // 16, 0], p[0]) > d0_t
        assert 1 <= n.min() and n.max() == K + 1


def test_point_mass_drafts_follow_the_target():
    target, q = _dists(2)
    p0 = softmax(target[0])
    tok, n = _run_random(target, q, point_mass=True)
    assert l2(tok[:, 0], p0) < 0.03
    d = q[0].argmax()
    # acceptance rate of draft 0 is p0(d)
    assert abs(np.mean(n >= 2) - p0[d]) < 0.03


def test_greedy_accepts_while_draft_is_the_argmax():
    rng = np.random.default_rng(3)
    r = 6
    logits = rng.normal(size=(r, K + 1, V)).astype(np.float32)
    am = logits.argmax(axis=2)
    drafts = am[:, :K].copy()
    drafts[1, 0] = (am[1, 0] + 1) % V            # rejected at 0
    drafts[2, 1] = (am[2, 1] + 1) % V            # rejected at 1
    num_draft = np.array([K, K, K, 1, 0, K], np.int32)
    rows = [SamplingRow(SamplingParams(temperature=0.0), 0, 0) for _ in range(r)]
    for all_greedy in (True, False):
        tok, n = (np.asarray(a) for a in VERIFY(logits, drafts.astype(np.int32), num_draft,
                                                 _batch(rows), all_greedy=all_greedy))
        assert n.tolist() == [3, 1, 2, 2, 1, 3]
        for i in range(r):
            assert tok[i, :n[i]].tolist() == am[i, :n[i]].tolist()


def test_no_draft_rows_sample_like_the_ordinary_sampler_and_seeds_reproduce():
    rng = np.random.default_rng(4)
    r, v = 16, 300                              # > SORT_CAP: the capped top-k path is exercised
    logits = rng.normal(0, 2, (r, v)).astype(np.float32)
    params = [SamplingParams(temperature=0.8, top_k=5), SamplingParams(temperature=1.0, top_p=0.7),
              SamplingParams(temperature=1.2, min_p=0.1), SamplingParams(temperature=0.0),
              SamplingParams(temperature=1.0)]
    rows = [SamplingRow(params[i % len(params)], 100 + i, 7 + i) for i in range(r)]
    batch = _batch(rows, v)
    ref = np.asarray(jax.jit(sample, static_argnames=("flags",))(logits, batch, FLAGS).token_ids)
    wide = np.tile(logits[:, None], (1, K + 1, 1))
    tok, n = VERIFY(wide, np.zeros((r, K), np.int32), np.zeros(r, np.int32), batch,
                    all_greedy=False)
    assert np.asarray(n).tolist() == [1] * r
    assert np.asarray(tok)[:, 0].tolist() == ref.tolist()
    # seeded and batch-invariant: row 3 alone (first row of a batch) draws the same tokens
    drafts = rng.integers(0, v, (r, K)).astype(np.int32)
    full = np.asarray(VERIFY(wide, drafts, np.full(r, K, np.int32), batch, all_greedy=False)[0])
    again = np.asarray(VERIFY(wide[::-1].copy(), drafts[::-1].copy(), np.full(r, K, np.int32),
                              _batch(rows[::-1], v), all_greedy=False)[0])
    assert (full == again[::-1]).all()
