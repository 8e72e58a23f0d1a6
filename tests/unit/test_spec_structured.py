"""Structured outputs and token masks with speculative decoding.

A verify row samples at 1 + k positions, and a grammar's mask differs at each: the host
advances the matcher along the drafts (``ConstraintTracker.draft_masks``, then rolls it back)
and the verify step applies position j's mask to the target there, so a draft the grammar
rejects has target probability 0 and is never accepted. Greedy output under a grammar (and
under logit_bias / allowed_token_ids / bad_words) is token-identical with and without
speculation, for n-gram drafts and for a draft model that knows nothing of the grammar (it
drafts the unconstrained continuation, which the masks must reject); sampled constrained rows
stay valid.
"""

from __future__ import annotations

import json
import re

import jsonschema
import llguidance.numpy as llnp
import numpy as np
import pytest
from engine_helpers import CompileCounter, run_engine
from fixture_paths import GOLDEN
from structured_cases import PROMPTS, SCHEMA

from jserve.sampling_params import SamplingParams

NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "disable_by_batch_size": None,
         "prompt_lookup_min": 1,
         "prompt_lookup_max": 3}
DRAFT = {"method": "draft_model", "model": str(GOLDEN / "llama"), "num_speculative_tokens": 3,
         "disable_by_batch_size": None}


@pytest.fixture(scope="module")
def base(make_engine):
    # (the host path, as speculative engines take: llguidance forces a literal's canonical
    # tokenization, the device automata allow every one, so token ids would differ)
    return make_engine(grammar_device_states=0)


@pytest.fixture(scope="module")
def ngram(make_engine):
    return make_engine("llama", speculative_config=NGRAM)


@pytest.fixture(scope="module")
def drafted(make_engine):
    return make_engine("llama", num_pages=24, swap_space_gb=0.001, speculative_config=DRAFT)


def _items():
    js = SamplingParams(temperature=0, max_tokens=60, structured_outputs={"json": SCHEMA})
    rx = SamplingParams(temperature=0, max_tokens=30, structured_outputs={"regex": r"(ab|cd){2,6}x"})
    vocab_ids = list(range(40, 80))
    return ([(p, js) for p in PROMPTS]
            + [(PROMPTS[0], rx),
               (PROMPTS[1], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True,
                                           allowed_token_ids=vocab_ids)),
               (PROMPTS[2], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True,
                                           logit_bias={50: 8.0, 51: 6.0})),
               (PROMPTS[3], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True,
                                           bad_words=["the", "a"])),
               (PROMPTS[0], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))])


def _summary(outs):
    return [[(c.token_ids, c.text, c.finish_reason) for c in o.outputs] for o in outs]


@pytest.mark.parametrize("which", ["ngram", "drafted"])
def test_greedy_constrained_rows_match_without_speculation(base, which, request):
    eng = request.getfixturevalue(which)
    items = _items()
    ref = run_engine(base, items)
    before = dict(eng.kv_cache_stats())
    with CompileCounter() as c:     # per-position mask rows and their writer: warm-up only
        got = run_engine(eng, items)
    assert c.count == 0
    assert _summary(got) == _summary(ref)
    for o in got[:len(PROMPTS)]:
        c = o.outputs[0]
        assert c.finish_reason == "stop", c
        jsonschema.validate(json.loads(c.text), SCHEMA)
    # drafts were verified on the constrained rows themselves
    assert sum(o.metrics["spec_num_draft_tokens"] for o in got[:len(PROMPTS) + 1]) > 0
    after = eng.kv_cache_stats()
    assert after["spec_decode_num_draft_tokens"] > before["spec_decode_num_draft_tokens"]
    if which == "drafted":
        # the draft knows no grammar: some of its drafts were rejected by the masks alone
        rate = ((after["spec_decode_num_accepted_tokens"] - before["spec_decode_num_accepted_tokens"])
                / (after["spec_decode_num_draft_tokens"] - before["spec_decode_num_draft_tokens"]))
        assert rate < 0.99


@pytest.mark.parametrize("which", ["ngram", "drafted"])
def test_sampled_constrained_rows_stay_valid(which, request):
    eng = request.getfixturevalue(which)
    items = [(p, SamplingParams(temperature=0.9, seed=i, max_tokens=60,
                                structured_outputs={"json": SCHEMA}))
             for i, p in enumerate(PROMPTS)]
    items.append(("x", SamplingParams(temperature=1.0, seed=3, n=3, max_tokens=30,
                                      structured_outputs={"regex": r"(cat|dog)s? [0-9]{2}"})))
    outs = run_engine(eng, items)
    for o in outs[:len(PROMPTS)]:
        c = o.outputs[0]
        if c.finish_reason == "stop":
            jsonschema.validate(json.loads(c.text), SCHEMA)
    for c in outs[-1].outputs:
        assert re.fullmatch(r"(cat|dog)s? [0-9]{2}", c.text), c.text
    again = run_engine(eng, items[:1])
    assert again[0].outputs[0].token_ids == outs[0].outputs[0].token_ids   # seeded


def test_draft_masks_follow_the_grammar_along_the_drafts(ngram):
    """Position j's mask is the mask after the output and the first j drafts; past a draft
    the grammar rejects, positions are all ones; the matcher is left where it was."""
    cons = ngram.constraints
    tok = ngram.tokenizer
    sp = SamplingParams(temperature=0, max_tokens=10, structured_outputs={"regex": "(ab|cd)+x"})
    grammar = cons.compile(sp)
    cons.add("probe", sp, grammar, [])
    try:
        ids = tok.encode("abcd", add_special_tokens=False)       # the grammar accepts these
        bad = tok.encode("q", add_special_tokens=False)[0]        # and rejects this after them
        drafts = ids + [bad] + ids[:1]
        masks = cons.draft_masks([("probe", [], drafts)])["probe"]
        assert masks.shape == (len(drafts) + 1, cons.words)
        ref = cons._grammars().matcher(grammar)
        for j in range(len(ids) + 1):
            want = np.full((1, cons.words), -1, np.int32)
            llnp.fill_next_token_bitmask(ref, want, 0)
            assert (masks[j] == want[0]).all(), j
            if j < len(ids):
                assert ref.consume_token(ids[j])
        bits = masks[len(ids)].view(np.uint32)
        assert not (int(bits[bad >> 5]) >> (bad & 31)) & 1       # the verify step rejects it
        assert (masks[len(ids) + 1:] == -1).all()                 # never reached
        again = cons.masks([("probe", [])])["probe"]              # rolled back
        assert (again == masks[0]).all()
    finally:
        cons.remove("probe")


def test_logit_state_rows_per_verify_position():
    """LogitState(positions=K + 1): a verify row's position j reads row slot + j * S (its own
    mask ANDed with the slot's static bits, biases kept); a static-only row reads the slot's
    row at every position (mask_step 0)."""
    import jax
    import jax.numpy as jnp

    from jserve.structured.logit_state import LogitState, apply_logit_state, pack_token_ids

    v, s, k1 = 70, 4, 3
    st = LogitState(s, v, jax.sharding.SingleDeviceSharding(jax.devices()[0]), positions=k1)
    st.compile()
    st.on_new(1, SamplingParams(allowed_token_ids=[3, 4, 5, 6], logit_bias={4: 2.0}))
    st.on_new(2, SamplingParams(logit_bias={9: 1.5}))
    grammar = [pack_token_ids(ids, v) for ids in ([3, 4], [5, 60], [6])]
    slot1, step1 = st.rows_for(1, grammar)
    slot2, step2 = st.rows_for(2, grammar[:1])
    st.flush()
    assert (slot1, step1, slot2, step2) == (1, s, 2, 0)
    rows = np.array([[slot1 + j * step1 for j in range(k1)], [slot2 + j * step2 for j in range(k1)]])
    logits = np.random.default_rng(1).normal(size=(2 * k1, v)).astype(np.float32)
    got = np.asarray(apply_logit_state(jnp.asarray(logits), st.device,
                                       jnp.asarray(rows.reshape(-1), jnp.int32)))
    want = np.full_like(logits, -np.inf)
    for j, ids in enumerate(([3, 4], [5], [6])):     # ANDed with allowed_token_ids {3..6}
        want[j, ids] = logits[j, ids] + np.where(np.array(ids) == 4, 2.0, 0.0)
    for j in range(k1):                              # slot 2: its position-0 row everywhere
        want[k1 + j, [3, 4]] = logits[k1 + j, [3, 4]]
    np.testing.assert_allclose(got, want)
