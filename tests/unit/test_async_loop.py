"""The overlapped loop (async_scheduling) gives exactly what the synchronous reference gives.

Step N+1 is scheduled and dispatched before step N's tokens are read, so requests finish one
step late on the host. These tests run the same requests through both loops of the tiny golden
llama (one engine build each, same shapes: the second hits the compile cache) and compare
tokens, text, finish_reason, stop_reason, usage and logprobs; then abort requests while their
rows are in flight, and check that no page or runner slot is left behind.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from engine_helpers import run_engine

from jserve.sampling_params import SamplingParams
from jserve.step_program import StepVariant


@pytest.fixture(scope="module")
def engines(make_engine):
    return {overlap: make_engine("llama", async_scheduling=overlap) for overlap in (False, True)}


def _summary(out):
    return [(c.token_ids, c.text, c.finish_reason, c.stop_reason, len(c.token_ids),
             None if c.logprobs is None else [sorted((k, round(v.logprob, 4)) for k, v in d.items())
                                              for d in c.logprobs])
            for c in out.outputs]


def _requests(engine):
    """A mix hitting every way to finish: stop strings, stop token ids (EOS-like), max_tokens,
    min_tokens bans, n > 1, logprobs, seeded sampling, penalties (the synchronous fallback)."""
    rng = np.random.default_rng(7)
    prompts = [rng.integers(5, 500, n).tolist() for n in (3, 9, 17, 30, 5, 12, 21, 8)]
    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    ref = [o.outputs[0] for o in run_engine(engine, [(p, greedy) for p in prompts[:4]])]
    stop_tok = ref[0].token_ids[5]          # a token the greedy run emits: stops it early
    stop_str = ref[1].text[4:9] if len(ref[1].text) > 9 else ref[1].text[-3:]
    return [
        (prompts[0], SamplingParams(temperature=0.0, max_tokens=24, stop_token_ids=[stop_tok])),
        (prompts[0], SamplingParams(temperature=0.0, max_tokens=24, stop_token_ids=[stop_tok],
                                    min_tokens=8)),
        (prompts[1], SamplingParams(temperature=0.0, max_tokens=24, stop=[stop_str])),
        (prompts[1], SamplingParams(temperature=0.0, max_tokens=24, stop=[stop_str],
                                    include_stop_str_in_output=True)),
        (prompts[2], SamplingParams(temperature=0.0, max_tokens=1)),
        (prompts[3], SamplingParams(temperature=0.9, top_p=0.9, seed=11, max_tokens=13, n=3)),
        (prompts[4], SamplingParams(temperature=0.0, max_tokens=9, logprobs=3)),
        (prompts[5], SamplingParams(temperature=1.0, top_k=7, seed=5, max_tokens=10, logprobs=0)),
        (prompts[6], SamplingParams(temperature=0.7, seed=2, repetition_penalty=1.3,
                                    frequency_penalty=0.4, max_tokens=11)),
        (prompts[7], SamplingParams(temperature=0.0, max_tokens=30)),
    ]


def test_overlapped_loop_equals_synchronous_reference(engines):
    items = _requests(engines[False])
    sync = [_summary(o) for o in run_engine(engines[False], items)]
    overlapped = [_summary(o) for o in run_engine(engines[True], items)]
    for i, (a, b) in enumerate(zip(sync, overlapped, strict=True)):
        assert a == b, f"request {i} ({items[i][1]}) differs"
    # The mix did exercise the early exits.
    reasons = {c[2] for s in sync for c in s}
    assert reasons == {"stop", "length"}
    assert any(c[3] is not None and isinstance(c[3], str) for s in sync for c in s)


def test_usage_counts_exactly_the_emitted_tokens(engines):
    sp = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    outs = run_engine(engines[True], [([7, 8, 9], sp), ([10, 11], sp)])
    for o in outs:
        assert len(o.outputs[0].token_ids) == 5 and o.outputs[0].finish_reason == "length"


def _drain(engine):
    while engine.has_unfinished_requests():
        engine.step()


@pytest.mark.parametrize("overlap", [False, True])
def test_aborts_mid_flight_lose_nothing_and_leak_nothing(engines, overlap):
    engine = engines[overlap]
    sp = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(5, 500, n).tolist() for n in (6, 14, 25, 9)]
    alone = [run_engine(engine, [(p, sp)])[0].outputs[0].token_ids for p in prompts]
    ids = [engine.add_request(None, p, sp) for p in prompts]
    seen: dict[str, list[int]] = {}
    aborted = {ids[1], ids[3]}
    for step in range(40):
        for out in engine.step():
            seen[out.request_id] = out.outputs[0].token_ids
            if out.request_id in aborted:
                assert not out.finished or out.outputs[0].finish_reason == "abort"
        if step == 3:  # rows of both are in flight now (overlapped: step 4 already dispatched)
            for rid in aborted:
                engine.abort_request(rid)
        if not engine.has_unfinished_requests():
            break
    _drain(engine)
    assert seen[ids[0]] == alone[0] and seen[ids[2]] == alone[2]
    for i in (1, 3):  # an aborted request's tokens are a prefix of its tokens alone
        assert seen[ids[i]] == alone[i][:len(seen[ids[i]])]
    # Nothing left: every page is free or cached, and the runner holds no request.
    engine.step()  # delivers the last drops to the runner
    stats = engine.stats()
    assert stats.num_running == stats.num_waiting == 0
    assert stats.kv_cache["pages_used"] == 0  # cached pages are free (evictable), not used
    assert len(engine.runner.rows) == 0


def test_greedy_steps_take_the_step_without_conditionals(engines):
    """A conditional in the step makes the host wait for the device (XLA GPU reads its
    predicate on the host): greedy steps without logprobs run a variant that has none."""
    engine = engines[True]
    runner = engine.runner
    control_flow = ("stablehlo.case", "stablehlo.if", "stablehlo.while")
    greedy_text = runner.lower_step((16, False, True)).as_text()
    assert not any(op in greedy_text for op in control_flow)
    assert "stablehlo.case" in runner.lower_step((16, False, False)).as_text()
    calls, original = {}, dict(runner._compiled)
    for key, fn in original.items():
        def counted(*a, _fn=fn, _key=key):
            calls[_key] = calls.get(_key, 0) + 1
            return _fn(*a)
        runner._compiled[key] = counted
    try:
        run_engine(engine, [([3, 4, 5], SamplingParams(temperature=0.0, max_tokens=6))])
        assert all(v.greedy for v in calls)
        assert any(v.decode_only for v in calls), "no step took the greedy decode-only variant"
        calls.clear()
        run_engine(engine, [([3, 4, 5], SamplingParams(temperature=0.0, max_tokens=6, logprobs=1))])
        assert not any(v.greedy for v in calls)
    finally:
        runner._compiled = original


def test_greedy_variants_only_where_a_pure_decode_step_lands(engines):
    """The greedy and the plain-sampler variants exist where a pure decode step lands; the
    general sampler everywhere else (and in the largest bucket, for batches with filters)."""
    runner = engines[True].runner      # max_num_seqs 8, token buckets 16 / 32 / 64
    assert runner.variants() == [StepVariant(16, False, False, plain=True), StepVariant(16, False, True),
                                 StepVariant(16, False, True, decode_only=True),
                                 StepVariant(32, False, False), StepVariant(64, False, False)]
    assert set(runner._compiled) == set(runner.variants())


def test_decode_variants_have_no_conditional(engines):
    """An XLA GPU conditional reads its predicate on the host, so the thread launching the step
    waits there for the device: the variants decode steps take (greedy, plain sampler, the split
    step's sampler) have none; the general sampler has its run-time branches."""
    runner = engines[True].runner

    def branches(lowered) -> int:
        text = lowered.as_text()
        return text.count("stablehlo.if") + text.count("stablehlo.case")

    assert branches(runner.lower_step(StepVariant(16, False, False, plain=True))) == 0
    assert branches(runner.lower_step(StepVariant(16, False, True))) == 0
    assert branches(runner.lower_split(16)[1]) == 0
    assert branches(runner.lower_step(StepVariant(32, False, False))) > 0


def test_a_finished_step_is_read_after_the_next_launch(engines):
    """A step in flight that has finished is read after the next step's launch, not before: its
    tokens' copy to the host lands while the host launches (with the device idle, reading it
    first made the launch wait for that copy). Its results are what the device arrays hold."""
    engine = engines[True]
    engine.add_request("late", [3, 4, 5], SamplingParams(temperature=0.7, seed=1, max_tokens=4,
                                                          logprobs=2, ignore_eos=True))
    engine.step()
    first = engine._in_flight
    jax.block_until_ready((first.tokens, first.logprobs))
    want, want_tokens = first.result(), first.tokens
    assert first.ready() and isinstance(want_tokens, jax.Array)
    order = []
    dispatch, update = engine.runner.dispatch, engine.scheduler.update
    engine.runner.dispatch = lambda out: order.append(("launch", type(first.tokens))) or dispatch(out)
    engine.scheduler.update = lambda so, ro: order.append("read") or update(so, ro)
    try:
        engine.step()
    finally:
        del engine.runner.dispatch, engine.scheduler.update
    assert order == [("launch", type(want_tokens)), "read"]   # still on the device at the launch
    assert first.result() == want
    run_engine(engine, [])
