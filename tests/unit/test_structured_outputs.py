"""Structured outputs and token masks end to end on the tiny golden engine: JSON schema, regex,
choice, grammar, allowed_token_ids, logit_bias, bad_words; constrained and free rows in one
step, n > 1, the overlapped loop equal to the synchronous one, prefix caching, preemption. The
host path (llguidance masks, the split step): these engines keep every grammar on the host
(``grammar_device_states=0``); the device automata: test_structured_device.py."""

from __future__ import annotations

import json
import re
import threading

import jax
import jsonschema
import pytest
from engine_helpers import run_engine
from structured_cases import PROMPTS, SCHEMA, check_prefix_cache_hit

from jserve.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def engine(make_engine):
    return make_engine(grammar_device_states=0)


@pytest.fixture(scope="module")
def sync_engine(make_engine):
    return make_engine(async_scheduling=False, grammar_device_states=0)


def _texts(outs):
    return [[c.text for c in o.outputs] for o in outs]


def test_json_schema_rows_validate_and_free_rows_are_unchanged(engine):
    free = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    alone = run_engine(engine, [(p, free) for p in PROMPTS])
    js = SamplingParams(temperature=0, max_tokens=60, structured_outputs={"json": SCHEMA})
    mixed = run_engine(engine, [x for p in PROMPTS for x in ((p, js), (p, free))])
    for i in range(len(PROMPTS)):
        c = mixed[2 * i].outputs[0]
        assert c.finish_reason == "stop", c
        jsonschema.validate(json.loads(c.text), SCHEMA)
        assert mixed[2 * i + 1].outputs[0].token_ids == alone[i].outputs[0].token_ids


def test_sampled_n_regex_choice_and_grammar(engine):
    pat = r"(cat|dog)s? [0-9]{2}"
    outs = run_engine(engine, [
        ("hello", SamplingParams(temperature=1.0, seed=5, n=4, max_tokens=30,
                                 structured_outputs={"regex": pat})),
        ("x", SamplingParams(temperature=0.8, seed=1, max_tokens=10,
                             structured_outputs={"choice": ["alpha", "beta", "gamma"]})),
        ("x", SamplingParams(temperature=0, max_tokens=20,
                             structured_outputs={"grammar": 'root ::= "yes" | "no" | "maybe" [0-9]'})),
        ("{", SamplingParams(temperature=0.7, seed=2, max_tokens=60, top_k=20,
                             structured_outputs={"json_object": True})),
    ])
    assert len(outs[0].outputs) == 4
    for c in outs[0].outputs:
        assert re.fullmatch(pat, c.text), c.text
    assert outs[1].outputs[0].text in ("alpha", "beta", "gamma")
    assert re.fullmatch(r"yes|no|maybe[0-9]", outs[2].outputs[0].text)
    if outs[3].outputs[0].finish_reason == "stop":
        assert isinstance(json.loads(outs[3].outputs[0].text), dict)
    else:  # ran out of tokens inside the object: still a valid prefix of one
        assert outs[3].outputs[0].text.startswith("{")


@pytest.mark.parametrize("in_flight_done", [False, True])
def test_overlapped_loop_equals_synchronous(engine, sync_engine, monkeypatch, in_flight_done):
    """The fused step (no split programs on CPU) gives the synchronous loop's texts in both
    orders: the step in flight read after the plan, or (done already) before it, its grammars
    advancing on the helper thread while the engine plans (grammar rows over static masks and
    biases, bad words)."""
    monkeypatch.setattr(engine, "_in_flight_done", lambda: in_flight_done)
    advance, threads = engine.grammar.advance, set()
    monkeypatch.setattr(engine.grammar, "advance",
                        lambda reqs: threads.add(threading.current_thread().name) or advance(reqs))
    items = [(p, SamplingParams(temperature=0.9, seed=i, max_tokens=40,
                                structured_outputs={"json": SCHEMA}))
             for i, p in enumerate(PROMPTS)]
    items += [
        ("y", SamplingParams(temperature=0.7, seed=3, max_tokens=12, logit_bias={86: 3.0},  # 'q'
                             allowed_token_ids=list(range(40, 400)),
                             structured_outputs={"regex": r"[a-z]{3,9}"})),
        ("def f(x):", SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, bad_words=["x"])),
    ]
    items += [(p, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)) for p in PROMPTS]
    assert _texts(run_engine(engine, items)) == _texts(run_engine(sync_engine, items))
    assert any(t.startswith("jserve-grammar") for t in threads) == in_flight_done, threads


def test_token_masks_and_biases(engine):
    tok = engine.tokenizer
    bad = tok.decode(run_engine(engine, [("def f(x):", SamplingParams(
        temperature=0, max_tokens=1))])[0].outputs[0].token_ids)
    outs = run_engine(engine, [
        ("x", SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, allowed_token_ids=[5, 6, 7])),
        ("x", SamplingParams(temperature=0.5, seed=0, max_tokens=6, ignore_eos=True,
                             logit_bias={9: 100.0})),
        ("def f(x):", SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, bad_words=[bad])),
    ])
    assert set(outs[0].outputs[0].token_ids) <= {5, 6, 7}
    assert outs[1].outputs[0].token_ids == [9] * 6
    banned = {ids[-1] for w in (bad, " " + bad) if len(ids := tok.encode(w, add_special_tokens=False)) == 1}
    assert banned and not banned & set(outs[2].outputs[0].token_ids)


def test_prefix_cache_hit_keeps_constraint(engine):
    check_prefix_cache_hit(lambda items: run_engine(engine, items))


def test_bad_specs_are_value_errors_naming_the_problem(engine):
    with pytest.raises(ValueError, match="strin"):
        engine.add_request(None, "x", SamplingParams(structured_outputs={
            "json": {"type": "object", "properties": {"a": {"type": "strin"}}}}))
    with pytest.raises(ValueError, match="regex"):
        engine.add_request(None, "x", SamplingParams(structured_outputs={"regex": "a(b"}))
    with pytest.raises(ValueError, match="grammar"):
        engine.add_request(None, "x", SamplingParams(structured_outputs={"grammar": "root ::= foo"}))
    with pytest.raises(ValueError, match="allowed_token_ids"):
        engine.add_request(None, "x", SamplingParams(allowed_token_ids=[10**6]))
    with pytest.raises(ValueError, match="exactly one"):
        SamplingParams(structured_outputs={"regex": "a", "json_object": True})
    with pytest.raises(ValueError, match="unknown key"):
        SamplingParams(structured_outputs={"jsn": {}})
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={1: 200})
    for bad, said in (({"-1": 1}, "token ids must be integers >= 0, got -1"),
                      ({"3": "a"}, "could not convert string to float")):
        with pytest.raises(ValueError, match=said) as e:
            SamplingParams(logit_bias=bad)
        assert str(e.value).count("logit_bias") == 1, e.value   # was "logit_bias: logit_bias: ..."
    for name in ("stop", "stop_token_ids", "allowed_token_ids", "bad_words"):   # was "'int' object ..."
        with pytest.raises(TypeError, match=f"SamplingParams.{name} must be a .*list.*, got int"):
            SamplingParams(**{name: 3})
    assert not engine.has_unfinished_requests()


def test_preempted_constrained_requests_still_validate(make_engine):
    eng = make_engine(num_pages=14, max_num_seqs=4, grammar_device_states=0)
    pat = r"(ab|cd){30}"
    sp = SamplingParams(temperature=0, max_tokens=100, structured_outputs={"regex": pat})
    outs = run_engine(eng, [(p, sp) for p in PROMPTS])
    assert eng.stats().num_preemptions_total > 0
    for o in outs:
        assert re.fullmatch(pat, o.outputs[0].text), o.outputs[0].text


@pytest.mark.parametrize("order", ["forward first", "beside", "ahead", "read first"])
def test_split_step_equals_synchronous(engine, sync_engine, monkeypatch, order):
    """The split step (jserve/split_step.py: forward dispatched before the step in flight is
    read, sampler after the host masks) gives the synchronous loop's tokens and logprobs, with
    grammar rows over static masks, penalties, a row finishing mid-flight and free rows. The
    orders: the step in flight still running (forward, then read and masks); already done (read,
    then masks on the helper thread beside the forward's dispatch); and already done with the
    masks filled ahead in request order and put on the device beside the plan (the sampler
    reads each row's mask from its row of them); and the last one with the step in flight still
    running, waited for (waiting costs less than the grammar work it lets run beside the plan)."""
    engine.runner.compile_split()
    monkeypatch.setattr(engine, "_in_flight_done", lambda: order in ("beside", "ahead"))
    if order == "beside":
        monkeypatch.setattr(engine.grammar, "covers", lambda *_: False)
    if order == "read first":
        put = engine.grammar._advance_and_put
        monkeypatch.setattr(engine.grammar, "_advance_and_put", lambda *a: (
            put(*a), setattr(engine.grammar, "seconds", 1e9))[0])
        monkeypatch.setattr(engine.grammar, "read_first", True)
        monkeypatch.setattr(engine.grammar, "seconds", 1e9)
    beside = engine.grammar.forward_beside
    calls = []
    monkeypatch.setattr(engine.grammar, "forward_beside", lambda *a: calls.append(1) or beside(*a))
    before, ahead = engine.runner.split.steps, engine.grammar.ahead_steps
    # Both programs take the packed input as a device buffer that keeps its address from call
    # to call (a host array would be a fresh buffer: a CUDA-graph update); the sampler gets the
    # host masks on the device (uploaded beside the forward's launch in the helper-thread order).
    programs, addresses = engine.runner.split.programs, {}

    def recorded(fn, name):
        def call(*args):
            for i in ((4,) if name == "forward" else (4, 6)):
                assert isinstance(args[i], jax.Array), (name, i, type(args[i]))
            addresses.setdefault((name, args[4].shape), set()).add(args[4].unsafe_buffer_pointer())
            return fn(*args)
        return call

    monkeypatch.setattr(engine.runner.split, "programs", lambda t: tuple(
        recorded(fn, name) for fn, name in zip(programs(t), ("forward", "sampler"), strict=True)))
    # (a free row first: the grammar rows' rows of the masks put ahead are not their step rows)
    items = [("z", SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))]
    items += [(p, SamplingParams(temperature=0.9, seed=i, max_tokens=40, logprobs=2,
                                 structured_outputs={"json": SCHEMA}))
              for i, p in enumerate(PROMPTS)]
    items += [
        ("x", SamplingParams(temperature=0.8, seed=1, max_tokens=10,
                             structured_outputs={"choice": ["alpha", "beta", "gamma"]})),
        ("y", SamplingParams(temperature=0.7, seed=3, max_tokens=12, repetition_penalty=1.3,
                             logit_bias={9: 2.0}, structured_outputs={"regex": r"[a-z]{3,9}"})),
        ("def f(x):", SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, bad_words=["x"])),
    ]
    items += [(p, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)) for p in PROMPTS]

    def tokens_and_logprobs(outs):
        return [[(c.token_ids, [sorted((t, round(lp.logprob, 4)) for t, lp in d.items())
                                for d in c.logprobs or []]) for c in o.outputs] for o in outs]

    assert tokens_and_logprobs(run_engine(engine, items)) == tokens_and_logprobs(
        run_engine(sync_engine, items))
    assert engine.runner.split.steps > before
    assert (engine.grammar.ahead_steps > ahead) == (order in ("ahead", "read first"))
    if order in ("forward first", "beside"):   # (with masks put ahead: steps they cannot cover)
        assert bool(calls) == (order == "beside")
    assert addresses and all(len(a) == 1 for a in addresses.values()), addresses


def test_in_flight_done_asks_the_device(engine):
    """The engine takes the helper-thread order only once the step in flight is done."""
    engine.add_request("done?", "x", SamplingParams(max_tokens=3, structured_outputs={"choice": ["ab"]}))
    engine.step()
    assert engine._in_flight is not None
    engine._in_flight.tokens.block_until_ready()
    assert engine._in_flight_done()
    run_engine(engine, [])


def test_start_up_compiles_the_split_pairs_beside_the_step_variants(make_engine, sync_engine,
                                                                    monkeypatch):
    """Where the split step is wanted (GPUs and TPUs), ``Runner.compile`` compiles each bucket's
    (forward, sampler) pair in the same pool as the step variants: every pair is ready when the
    engine is, and constrained requests then run split steps with the synchronous loop's tokens."""
    from jserve.runner import Runner

    monkeypatch.setattr(Runner, "split_wanted", lambda self: True)
    eng = make_engine(max_num_batched_tokens=32, grammar_device_states=0)
    assert eng.runner.split.buckets and all(eng.runner.split.ready(t) for t in eng.runner.split.buckets)
    items = [(p, SamplingParams(temperature=0.9, seed=i, max_tokens=12, structured_outputs={"json": SCHEMA}))
             for i, p in enumerate(PROMPTS[:2])]
    assert [o.outputs[0].token_ids for o in run_engine(eng, items)] == [
        o.outputs[0].token_ids for o in run_engine(sync_engine, items)]
    assert eng.runner.split.steps > 0


def test_masks_put_ahead_fill_every_row(engine, sync_engine, monkeypatch):
    """Every row of the split step host-masked (the block of masks put ahead full, no all-ones
    row left): the sampler still takes each row's own mask, as the synchronous loop does."""
    engine.runner.compile_split()
    monkeypatch.setattr(engine, "_in_flight_done", lambda: True)
    covers, full = engine.grammar.covers, []
    monkeypatch.setattr(engine.grammar, "covers", lambda out, ahead: full.append(
        len(ahead.rows_of) == ahead.rows) or covers(out, ahead))
    items = [(f"{i}", SamplingParams(temperature=0.9, seed=i, max_tokens=24,
                                     structured_outputs={"regex": r"[a-z]{4,12}( [0-9]{2})?"}))
             for i in range(engine.runner.bucket_for(1)[1])]
    assert _texts(run_engine(engine, items)) == _texts(run_engine(sync_engine, items))
    assert any(full), full
