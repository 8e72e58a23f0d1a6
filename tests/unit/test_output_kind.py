"""SamplingParams.output_kind: FINAL_ONLY requests report once, when finished, with the same
tokens, text and logprobs as CUMULATIVE ones; LLM.generate uses it; DELTA is refused by name."""

import dataclasses

import pytest
from engine_helpers import run_engine

from jserve import LLM, RequestOutputKind, SamplingParams

FINAL = RequestOutputKind.FINAL_ONLY


@pytest.fixture(scope="module")
def engine(make_engine):
    return make_engine()


def _view(outs):
    return [[(c.text, c.token_ids, c.finish_reason, c.stop_reason, c.cumulative_logprob,
              [sorted(d) for d in c.logprobs or []]) for c in o.outputs] for o in outs]


def test_final_only_reports_once_with_cumulative_results(engine):
    items = [("The quick brown", SamplingParams(temperature=0.8, seed=3, max_tokens=12, logprobs=2)),
             ("Once upon a time", SamplingParams(temperature=0.9, seed=5, n=2, max_tokens=10)),
             ("Hello", SamplingParams(temperature=0, max_tokens=20, stop=[" the", "e"],
                                      include_stop_str_in_output=True)),
             ("A", SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))]
    cumulative = run_engine(engine, items)
    final = [(p, dataclasses.replace(sp, output_kind=FINAL)) for p, sp in items]
    ids = [engine.add_request(None, p, sp) for p, sp in final]
    reports = {i: [] for i in ids}
    while engine.has_unfinished_requests():
        for out in engine.step():
            reports[out.request_id].append(out)
    assert all(len(r) == 1 and r[0].finished for r in reports.values())
    assert _view([reports[i][0] for i in ids]) == _view(cumulative)
    assert all(reports[i][0].metrics["first_token_time"] >= reports[i][0].metrics["arrival_time"]
               for i in ids)


def test_llm_generate_asks_for_final_outputs_only(engine, monkeypatch):
    llm = LLM.__new__(LLM)
    llm.engine = engine
    kinds = []
    add = engine.add_request
    monkeypatch.setattr(engine, "add_request",
                        lambda rid, p, sp, *a, **k: kinds.append(sp.output_kind) or add(rid, p, sp, *a, **k))
    sp = SamplingParams(temperature=0, max_tokens=5)
    outs = llm.generate(["The quick brown", "Hello"], sp)
    assert kinds == [FINAL, FINAL] and sp.output_kind is RequestOutputKind.CUMULATIVE
    assert [o.outputs[0].token_ids for o in outs] == [
        o.outputs[0].token_ids for o in run_engine(engine, [("The quick brown", sp), ("Hello", sp)])]


def test_delta_is_refused_by_name():
    with pytest.raises(ValueError, match="output_kind.*DELTA is not supported"):
        SamplingParams(output_kind=RequestOutputKind.DELTA)
    with pytest.raises(ValueError, match="output_kind"):
        SamplingParams(output_kind=2)
