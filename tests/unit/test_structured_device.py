"""Grammars on the device (jserve/structured/device_grammars.py) end to end on the tiny golden
engine: which requests take a token automaton, outputs valid and equal to the host path where
both accept the same strings, the overlapped loop equal to the synchronous one, n > 1, preemption
and resumption, the split step beside host-masked rows, a full table, and stop at completion."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
from engine_helpers import run_engine
from structured_cases import PROMPTS, SCHEMA, check_prefix_cache_hit

from jserve.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def engine(make_engine):
    return make_engine()


@pytest.fixture(scope="module")
def sync_engine(make_engine):
    return make_engine(async_scheduling=False)


@pytest.fixture(scope="module")
def host_engine(make_engine):
    return make_engine(grammar_device_states=0)


def _run(engine, items):
    """``run_engine`` with each spec's automaton compiled first (as the servers and ``LLM`` do:
    ``add_request`` itself never compiles one)."""
    for _, sp in items:
        engine.compile_grammar(sp)
    return run_engine(engine, items)


def _host_adds(engine, monkeypatch) -> list[str]:
    """The ids that take the host path from now on (``ConstraintTracker.add`` calls)."""
    seen, add = [], engine.constraints.add
    monkeypatch.setattr(engine.constraints, "add", lambda rid, *a: seen.append(rid) or add(rid, *a))
    return seen


def test_schema_rows_run_on_the_device_beside_free_rows(engine, monkeypatch):
    host = _host_adds(engine, monkeypatch)
    masks = []
    monkeypatch.setattr(engine.constraints, "masks", lambda *a, **k: masks.append(1) or {})
    free = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    alone = run_engine(engine, [(p, free) for p in PROMPTS])
    js = SamplingParams(temperature=0.8, seed=3, max_tokens=60, structured_outputs={"json": SCHEMA})
    mixed = _run(engine, [x for p in PROMPTS for x in ((p, js), (p, free))])
    assert not host and not masks   # no llguidance matcher, no host mask
    for i in range(len(PROMPTS)):
        c = mixed[2 * i].outputs[0]
        assert c.finish_reason == "stop", c
        jsonschema.validate(json.loads(c.text), SCHEMA)
        assert mixed[2 * i + 1].outputs[0].token_ids == alone[i].outputs[0].token_ids
    assert len(engine.device_grammars) == 0   # released with their requests
    assert all(e.users == 0 for e in engine.runner.automata._loaded.values())


def test_device_path_equals_host_path_where_the_tokens_agree(engine, host_engine):
    """A regex with no forced run of characters: both paths allow the same tokens at every
    step, so the same tokens come out (greedy, and sampled with seeds). (Where the grammar
    forces a literal, llguidance allows only its canonical tokenization, e.g. after "b" of the
    choice "beta" the token "et" and not "e"; the automaton allows every tokenization.)"""
    pat = r"(cat|dog)s? [0-9]{2}"
    items = [(p, SamplingParams(temperature=t, seed=i, n=2 if t else 1, max_tokens=20,
                                structured_outputs={"regex": pat}))
             for i, p in enumerate(PROMPTS) for t in (0.0, 1.0)]
    dev, host = _run(engine, items), run_engine(host_engine, items)
    assert [[c.token_ids for c in o.outputs] for o in dev] == [[c.token_ids for c in o.outputs] for o in host]
    assert all(c.finish_reason == "stop" and re.fullmatch(pat, c.text) for o in dev for c in o.outputs)


def test_choices_stop_when_complete(engine):
    choices = ["alpha", "beta", "a.b", "alphabet"]
    outs = _run(engine, [(p, SamplingParams(temperature=1.0, seed=i, n=3, max_tokens=20,
                                                  structured_outputs={"choice": choices}))
                               for i, p in enumerate(PROMPTS)])
    for o in outs:
        for c in o.outputs:
            assert c.text in choices and c.finish_reason == "stop", c


def test_automata_built_in_the_worker_process_run_on_the_device(engine, sync_engine, monkeypatch):
    """An engine whose compiler builds outlines' indexes in a child process (as from
    ``WORKER_MIN_VOCAB`` ids) runs those automata: the same tokens as the other engine with
    in-process automata (a regex no other test loads, so the rows come from the worker)."""
    from jserve.structured.automaton import AutomatonCompiler

    own = engine.automaton_compiler()
    worker = AutomatonCompiler(own._tokens, tuple(own.eos.tolist()), own.vocab_size, own.max_states,
                               tokenize=own._tokenize, worker=True)
    monkeypatch.setattr(engine, "_automata", worker)
    pat = r"(cow|pig)s? [0-9]{3}"
    items = [(p, SamplingParams(temperature=1.0, seed=i, max_tokens=20, structured_outputs={"regex": pat}))
             for i, p in enumerate(PROMPTS)]
    host = _host_adds(engine, monkeypatch)
    try:
        dev = _run(engine, items)
        assert worker._worker._proc is not None and len(worker._cache) == 1 and not host
    finally:
        worker.close()
    assert [o.outputs[0].token_ids for o in dev] == [o.outputs[0].token_ids for o in _run(sync_engine, items)]
    assert all(o.outputs[0].finish_reason == "stop" and re.fullmatch(pat, o.outputs[0].text) for o in dev)


def test_overlapped_loop_equals_synchronous(engine, sync_engine):
    items = [(p, SamplingParams(temperature=0.9, seed=i, max_tokens=40,
                                structured_outputs={"json": SCHEMA}))
             for i, p in enumerate(PROMPTS)]
    a, b = _run(engine, items), _run(sync_engine, items)
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]


def test_preempted_requests_resume_in_their_automaton_state(make_engine, monkeypatch):
    eng = make_engine(num_pages=14, max_num_seqs=4)
    host = _host_adds(eng, monkeypatch)
    pat = r"(ab|cd){30}"
    sp = SamplingParams(temperature=0, max_tokens=100, structured_outputs={"regex": pat})
    outs = _run(eng, [(p, sp) for p in PROMPTS])
    assert eng.stats().num_preemptions_total > 0 and not host
    for o in outs:
        assert re.fullmatch(pat, o.outputs[0].text), o.outputs[0].text


def test_a_full_table_sends_requests_to_the_host_path(make_engine, monkeypatch):
    """A table of 8 states: the regex fits, the schema does not (host path); both valid."""
    eng = make_engine(grammar_device_states=8)
    host = _host_adds(eng, monkeypatch)
    small = SamplingParams(temperature=0, max_tokens=10, structured_outputs={"regex": "[ab]{3}"})
    big = SamplingParams(temperature=0, max_tokens=60, structured_outputs={"json": SCHEMA})
    outs = _run(eng, [("x", small), ("y", big)])
    assert host == [outs[1].request_id]
    assert re.fullmatch("[ab]{3}", outs[0].outputs[0].text)
    jsonschema.validate(json.loads(outs[1].outputs[0].text), SCHEMA)


def test_split_step_with_device_and_host_rows_equals_synchronous(make_engine, sync_engine,
                                                                  monkeypatch):
    """The split step's sampler advances the device automata too, beside host-masked rows (a
    grammar, bad words): the synchronous loop's tokens."""
    from jserve.runner import Runner

    monkeypatch.setattr(Runner, "split_wanted", lambda self: True)
    eng = make_engine(max_num_batched_tokens=32)
    items = [(PROMPTS[0], SamplingParams(temperature=0.9, seed=1, max_tokens=16,
                                         structured_outputs={"json": SCHEMA})),
             (PROMPTS[1], SamplingParams(temperature=0.9, seed=2, max_tokens=16,
                                         structured_outputs={"grammar": 'root ::= ("ab" | "cd")+'})),
             (PROMPTS[2], SamplingParams(temperature=0.9, seed=3, max_tokens=16, bad_words=["self"],
                                         structured_outputs={"regex": "[a-z ]{4,12}"}))]
    got = _run(eng, items)
    assert eng.runner.split.steps > 0
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids
                                                      for o in _run(sync_engine, items)]


def test_speculative_engines_have_no_table(make_engine):
    spec = make_engine(speculative_config='{"method": "ngram", "num_speculative_tokens": 2}')
    assert spec.runner.automata is None and spec.device_grammars is None


def test_a_spec_not_compiled_yet_takes_the_host_path_once(make_engine, monkeypatch):
    """``add_request`` never compiles an automaton on the engine thread: the first request of a
    new spec runs on the host path while a helper thread compiles it; later ones take it."""
    eng = make_engine(max_num_seqs=4)
    host = _host_adds(eng, monkeypatch)
    sp = SamplingParams(temperature=0, max_tokens=12, structured_outputs={"regex": "[xyz]{2,9}"})
    first = run_engine(eng, [("a", sp)])
    assert host == [first[0].request_id]
    assert eng.automaton_compiler().compile(sp.structured_outputs.key) is not None   # (built by now)
    second = run_engine(eng, [("a", sp)])
    assert host == [first[0].request_id]   # the second went to the device
    assert first[0].outputs[0].text == second[0].outputs[0].text
    assert re.fullmatch("[xyz]{2,9}", second[0].outputs[0].text)


def test_prefix_cache_hit_starts_the_automaton_afresh(engine):
    check_prefix_cache_hit(lambda items: _run(engine, items))
