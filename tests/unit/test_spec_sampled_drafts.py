"""Sampled drafts (jserve.spec.draft.draft_sample) verified with their q: the draft model's
random rows draw drafts from q (its logits through the row's temperature / top-k / top-p, with
a salted seed) and the rejection sampler's min(1, p/q) rule with residual resampling makes the
emitted tokens follow the target's distribution exactly. The test also runs broken rules (a q
without the sampling transforms; drafts drawn with the target's own noise) and checks that they
are caught: the measurement can fail."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from sampling_laws import l2, softmax, top_p

from jserve.sampling_batch import SamplerFlags, SamplingRow, pack_sampling
from jserve.sampling_params import SamplingParams
from jserve.spec.draft import DRAFT_SEED_SALT, draft_sample
from jserve.spec.rejection import rejection_sample

V, K, N = 8, 2, 6000
TEMP, TOP_P = 0.7, 0.9
FLAGS = SamplerFlags(all_greedy=False, any_filters=True)
VERIFY = jax.jit(rejection_sample, static_argnames=("all_greedy", "any_filters"))
DRAFT = jax.jit(draft_sample)


def _transformed(logits):
    """The ordinary sampler's law of one row: / TEMP, then top-p (ties: lower id first)."""
    return top_p(softmax(logits / TEMP), TOP_P)


def _batch(output_index=0, temperature=TEMP):
    rows = [SamplingRow(SamplingParams(temperature=temperature, top_p=TOP_P), 1000 + i, output_index)
            for i in range(N)]
    return pack_sampling(rows, N, V, flags=FLAGS)[0]


def _setup(seed=7):
    rng = np.random.default_rng(seed)
    target = rng.normal(0, 0.8, (K + 1, V)).astype(np.float32)
    draft = rng.normal(0, 0.8, (K, V)).astype(np.float32)
    return target, draft


def _drafts(draft_logits, batch):
    """Draft j of each row from draft_sample at output index j -> (ids [N, K], q [N, K, V])."""
    ids, qs = [], []
    for j in range(K):
        b = dataclasses.replace(batch, output_index=batch.output_index + j)
        tok, q = DRAFT(jnp.asarray(np.tile(draft_logits[j], (N, 1))), b)
        ids.append(np.asarray(tok))
        qs.append(np.asarray(q))
    return np.stack(ids, axis=1).astype(np.int32), np.stack(qs, axis=1)


def _verify(target, drafts, q, batch):
    logits = np.tile(target[None], (N, 1, 1))
    tok, n = VERIFY(logits, drafts, np.full(N, K, np.int32), batch, all_greedy=False,
                    draft_probs=None if q is None else q.astype(np.float32))
    return np.asarray(tok), np.asarray(n)


def test_draft_sample_draws_from_the_transformed_draft_distribution():
    _, draft = _setup()
    batch = _batch()
    drafts, q = _drafts(draft, batch)
    for j in range(K):
        want = _transformed(draft[j])
        np.testing.assert_allclose(q[0, j], want, atol=1e-5)        # q is the sampler's law
        assert l2(drafts[:, j], want) < 0.03
        assert l2(drafts[:, j], softmax(draft[j])) > 0.05          # not the raw draft's
    # the draws are the row's own (seeded) and independent of the target's: a target that IS
    # the draft accepts every draft
    same = np.concatenate([draft, draft[:1]])
    _, n = _verify(same, drafts, q, batch)
    assert (n == K + 1).mean() > 0.999
    # greedy rows draft the argmax
    g, _ = DRAFT(jnp.asarray(np.tile(draft[0], (N, 1))), _batch(temperature=0.0))
    assert (np.asarray(g) == draft[0].argmax()).all()


def test_sampled_drafts_verified_with_q_follow_the_target_and_broken_rules_do_not():
    target, draft = _setup()
    p = np.stack([_transformed(target[j]) for j in range(K + 1)])
    batch = _batch()
    drafts, q = _drafts(draft, batch)
    tok, n = _verify(target, drafts, q, batch)
    d0, d1 = l2(tok[:, 0], p[0]), l2(tok[n >= 2, 1], p[1])
    assert d0 < 0.03 and d1 < 0.05, (d0, d1)
    assert l2(tok[:, 0], q[0, 0]) > 4 * d0                           # not the draft's law
    assert 1 <= n.min() and n.max() == K + 1
    # the acceptance rate of draft 0 is sum(min(p, q)) (Leviathan et al., theorem 3.5)
    assert abs(np.mean(n >= 2) - np.minimum(p[0], q[0, 0]).sum()) < 0.03
    # point-mass verification of sampled drafts (accept with p(d)) is also exact, but accepts
    # less: passing q is what buys the acceptance rate
    tok_pm, n_pm = _verify(target, drafts, None, batch)
    assert l2(tok_pm[:, 0], p[0]) < 0.03
    assert np.mean(n_pm >= 2) < np.mean(n >= 2) - 0.05
    # broken: q without the sampling transforms (the raw draft softmax) -> biased output
    raw = np.broadcast_to(softmax(draft)[None], (N, K, V))
    tok_raw, _ = _verify(target, drafts, raw, batch)
    assert l2(tok_raw[:, 0], p[0]) > 3 * d0, (l2(tok_raw[:, 0], p[0]), d0)
    # broken: drafts drawn with the target's own noise (no seed salt) -> correlated, biased
    salt = jnp.asarray(DRAFT_SEED_SALT, jnp.uint32)
    unsalted = dataclasses.replace(batch, seed=batch.seed ^ salt[None, :])
    bad, bad_q = _drafts(draft, unsalted)
    tok_c, _ = _verify(target, bad, bad_q, batch)
    assert l2(tok_c[:, 0], p[0]) > 3 * d0, (l2(tok_c[:, 0], p[0]), d0)
