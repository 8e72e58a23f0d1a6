"""The mask / bias pieces without an engine: the in-jit application against a numpy
reference, bitmask packing, the grammar cache, bad-word masks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fixture_paths import GOLDEN

from jserve.sampling_params import SamplingParams
from jserve.structured.constraints import ConstraintTracker
from jserve.structured.grammar import GrammarCache, StructuredOutputsParams, make_ll_tokenizer
from jserve.structured.logit_state import LogitState, apply_logit_state, pack_token_ids, unpack_mask
from jserve.tokenizer import Tokenizer

V = 100


def test_pack_unpack_roundtrip():
    ids = [0, 31, 32, 63, 64, 99]
    words = pack_token_ids(ids, V)
    assert words.shape == (4,) and words.dtype == np.int32
    bits = np.asarray(unpack_mask(jnp.asarray(words)[None], V))[0]
    assert np.flatnonzero(bits).tolist() == ids


def test_apply_logit_state_matches_reference():
    rep = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    st = LogitState(4, V, rep)
    st.compile()
    st.on_new(1, SamplingParams(allowed_token_ids=[3, 4, 50], logit_bias={4: 2.5, 7: -1.0}))
    st.on_new(2, SamplingParams(logit_bias={10: 5.0}))
    st.on_new(3, SamplingParams())
    mask_slot = np.array([st.row_for(1, None), st.row_for(3, None), st.row_for(2, None),
                          st.row_for(0, pack_token_ids([8, 9], V))], np.int32)
    st.flush()
    assert mask_slot.tolist() == [1, -1, 2, 0]
    logits = np.random.default_rng(0).normal(size=(4, V)).astype(np.float32)
    got = np.asarray(apply_logit_state(jnp.asarray(logits), st.device, jnp.asarray(mask_slot)))
    want = np.full_like(logits, -np.inf)
    want[0, [3, 4, 50]] = logits[0, [3, 4, 50]] + np.array([0, 2.5, 0], np.float32)
    want[1] = logits[1]
    want[2] = logits[2]
    want[2, 10] += 5.0
    want[3, [8, 9]] = logits[3, [8, 9]]
    np.testing.assert_array_equal(got, want)


def test_host_mask_argument_matches_the_written_rows():
    """The split step's sampler takes each row's host mask as an argument (int32[R, W], all ones:
    none) and ANDs it with the row's static bits on the device; the fused step's path writes the
    AND into the state on the host (``masked_rows``). Same logits either way, including the
    empty AND (the host mask wins) and a row without any mask."""
    rep = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    st = LogitState(4, V, rep)
    st.compile()
    st.on_new(1, SamplingParams(allowed_token_ids=[3, 4, 50], logit_bias={4: 2.5, 7: -1.0}))
    st.on_new(2, SamplingParams(logit_bias={10: 5.0}))
    st.on_new(3, SamplingParams(allowed_token_ids=[3, 4, 50]))
    st.flush()
    host = np.full((4, st.words), -1, np.int32)
    host[0] = pack_token_ids([4, 50, 60], V)    # slot 1: AND -> {4, 50}, 4 biased
    host[1] = pack_token_ids([8, 9, 10], V)     # slot 2: bias only -> {8, 9, 10}, 10 biased
    host[2] = pack_token_ids([60, 61], V)       # slot 3: empty AND -> {60, 61}
    slots = np.array([1, 2, 3, 0])
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(4, V)).astype(np.float32))
    static = np.array([st.row_for(int(s), None) for s in slots], np.int32)
    got = np.asarray(apply_logit_state(logits, st.device, jnp.asarray(static), jnp.asarray(host)))
    want = np.full((4, V), -np.inf, np.float32)
    lg = np.asarray(logits)
    want[0, [4, 50]] = lg[0, [4, 50]] + np.array([2.5, 0], np.float32)
    want[1, [8, 9, 10]] = lg[1, [8, 9, 10]] + np.array([0, 0, 5.0], np.float32)
    want[2, [60, 61]] = lg[2, [60, 61]]
    want[3] = lg[3]
    np.testing.assert_array_equal(got, want)
    written = st.masked_rows(slots[:3], host[:3])   # the fused step's path: the AND on the host
    st.flush()
    ref = np.asarray(apply_logit_state(logits, st.device, jnp.asarray(np.append(written, -1))))
    np.testing.assert_array_equal(got, ref)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_dir(GOLDEN / "llama")


@pytest.fixture(scope="module")
def cache(tok):
    return GrammarCache(make_ll_tokenizer(tok.to_json(), 512, tuple(tok.eos_token_ids)))


def test_grammar_cache_compiles_once_per_spec(cache):
    a = StructuredOutputsParams(json={"type": "object", "properties": {"k": {"type": "integer"}}})
    b = StructuredOutputsParams(json='{"type": "object", "properties": {"k": {"type": "integer"}}}')
    misses = cache.misses
    g1, g2 = cache.compile(a), cache.compile(b)
    assert g1 == g2 and cache.misses == misses + 1 and cache.hits >= 1


def test_bad_words_mask(tok, cache):
    tr = ConstraintTracker(lambda: cache, 512, lambda t: tok.encode(t, add_special_tokens=False))
    words = tr.bad_word_ids(["return", "import os"])
    tr.add("r", SamplingParams(bad_words=["return", "import os"]), None, words)
    multi = [w for w in words if len(w) > 1]
    single = [w for w in words if len(w) == 1]
    assert multi
    w = multi[0]
    masks = tr.masks([("r", list(w[:-1]))])
    bits = np.asarray(unpack_mask(jnp.asarray(masks["r"])[None], 512))[0]
    assert not bits[w[-1]]
    assert all(not bits[s[0]] for s in single)
    free = np.asarray(unpack_mask(jnp.asarray(tr.masks([("r", [])])["r"])[None], 512))[0]
    assert free.sum() == 512 - len({s[0] for s in single}) - sum(
        1 for m in multi if len(m) == 1)


def test_grammar_mask_and_completion(cache):
    tr = ConstraintTracker(lambda: cache, 512, None)
    sp = SamplingParams(structured_outputs={"choice": ["yes", "no"]})
    tr.add("q", sp, tr.compile(sp), [])
    ids = cache.tokenizer.tokenize_str("no")
    bits = np.asarray(unpack_mask(jnp.asarray(tr.masks([("q", [])])["q"])[None], 512))[0]
    assert bits[ids[0]] and bits.sum() < 512
    assert tr.advance("q", ids) is True   # complete: the request ends here


def test_advance_all_matches_advance_one_by_one(cache):
    """The batched advance (one new token each: llguidance's parallel consume) ends and errs the
    same sequences as ``advance`` one by one: a completed choice, a rejected token, a sequence
    mid-way, one given two tokens at once, an unconstrained one and an unknown id."""
    yes, no = cache.tokenizer.tokenize_str("yes"), cache.tokenizer.tokenize_str("no")
    bad = next(t for t in range(512) if t not in (yes[0], no[0]))
    sp = SamplingParams(structured_outputs={"choice": ["yes", "no", "yes yes yes"]})

    def run(batched: bool) -> tuple[list[str], dict[str, str | None]]:
        tr = ConstraintTracker(lambda: cache, 512, None)
        for rid in ("done", "bad", "mid", "two"):
            tr.add(rid, sp, tr.compile(sp), [])
        tr.add("free", SamplingParams(), None, [])
        steps = [{"done": no[:1], "bad": [bad], "mid": yes[:1], "two": yes[:2], "free": [7],
                  "unknown": [1]}]
        if len(no) > 1:
            steps.append({"done": no})
        ended: list[str] = []
        for outputs in steps:
            items = list(outputs.items())
            ended += (tr.advance_all(items) if batched else
                      [rid for rid, out in items if tr.advance(rid, out)])
        return sorted(set(ended)), {rid: tr.error(rid) for rid in ("done", "bad", "mid", "two")}

    one, many = run(False), run(True)
    assert many == one
    assert "bad" in one[0] and one[1]["bad"] and "mid" not in one[0] and one[1]["mid"] is None
    assert "done" in one[0]
