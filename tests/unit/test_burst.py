"""Bursts (``num_scheduler_steps``): N greedy decode steps in one device program give exactly
the tokens, texts, finish reasons and usage of one step at a time, stop mid-burst without
emitting past the stop, fall back to ordinary steps for anything the host must touch per token,
and leave no page behind. One engine per setting over the tiny golden llama."""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
import pytest
from engine_helpers import run_engine
from fixture_paths import GOLDEN

from jserve.builder import EngineArgs, make_engine_config, resolve_model
from jserve.cli import build_parser, engine_args_from
from jserve.config import SchedulerConfig
from jserve.llm import LLM
from jserve.sampling_params import SamplingParams
from jserve.step_variants import StepVariants

N = 4


@pytest.fixture(scope="module")
def engines(make_engine):
    return {n: make_engine("llama", num_scheduler_steps=n, enable_prefix_caching=True)
            for n in (1, N)}


def _summary(out):
    return [(c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in out.outputs]


@contextlib.contextmanager
def _bursts(engine):
    """Record each plan's burst while the block runs (a wrapper around the engine's scheduler)."""
    seen, plain = [], engine.scheduler.schedule

    def schedule():
        out = plain()
        seen.append(out.burst)
        return out

    engine.scheduler.schedule = schedule
    try:
        yield seen
    finally:
        del engine.scheduler.schedule


def _run(engine, items, late=()):
    """Run items; ``late`` ones are added after the third step (mid-burst arrivals)."""
    ids = [engine.add_request(None, p, sp) for p, sp in items]
    done, steps = {}, 0
    while engine.has_unfinished_requests():
        steps += 1
        if steps == 3:
            ids += [engine.add_request(None, p, sp) for p, sp in late]
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return [done[i] for i in ids]


def _items(engine):
    rng = np.random.default_rng(3)
    prompts = [rng.integers(5, 500, n).tolist() for n in (5, 11, 19, 7, 23)]
    greedy = SamplingParams(temperature=0.0, max_tokens=26, ignore_eos=True)
    ref = [o.outputs[0] for o in run_engine(engine, [(p, greedy) for p in prompts[:2]])]
    stop_tok = ref[0].token_ids[6]        # emitted inside a burst: the row stops there
    stop_str = ref[1].text[5:9] if len(ref[1].text) > 9 else ref[1].text[-2:]
    items = [
        (prompts[0], SamplingParams(temperature=0.0, max_tokens=26, stop_token_ids=[stop_tok])),
        (prompts[1], SamplingParams(temperature=0.0, max_tokens=26, stop=[stop_str])),
        (prompts[2], SamplingParams(temperature=0.0, max_tokens=13, ignore_eos=True)),  # not a multiple of N
        (prompts[3], SamplingParams(temperature=0.0, max_tokens=30)),
    ]
    sampled = [   # the plain sampler's bursts: seeds, penalties, allowed ids, logit bias
        (prompts[2], SamplingParams(temperature=0.9, seed=5, max_tokens=21, ignore_eos=True)),
        (prompts[3], SamplingParams(temperature=0.7, seed=8, repetition_penalty=1.3,
                                    frequency_penalty=0.5, max_tokens=18, ignore_eos=True)),
        (prompts[4], SamplingParams(temperature=1.0, seed=2, allowed_token_ids=list(range(40, 90)),
                                    logit_bias={50: 5.0}, max_tokens=15, ignore_eos=True)),
        (prompts[0], SamplingParams(temperature=0.0, max_tokens=19, presence_penalty=0.8,
                                    ignore_eos=True)),
    ]
    late = [(prompts[4], SamplingParams(temperature=0.0, max_tokens=17, ignore_eos=True)),
            (prompts[0], SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True))]  # prefix hit
    return items, late, sampled


@pytest.mark.parametrize("overlap,kind", [(True, "greedy"), (False, "greedy"), (True, "sampled")])
def test_bursts_equal_one_step_at_a_time(engines, overlap, kind):
    one, burst = engines[1], engines[N]
    items, late, sampled = _items(one)
    if kind == "sampled":
        items, late = sampled, late[:1]
    want = [_summary(o) for o in _run(one, items, late)]
    free = burst.scheduler.pool.num_free
    burst._overlap = overlap   # the async_scheduling option, toggled on one engine (test only)
    try:
        with _bursts(burst) as seen:
            got = _run(burst, items, late)
    finally:
        burst._overlap = True
    assert [_summary(o) for o in got] == want   # tokens, text, finish and stop reasons
    assert N in seen and 1 in seen          # bursts ran, and ordinary steps around them
    assert burst.scheduler.pool.num_free == free


def test_no_burst_for_rows_the_host_touches(engines):
    """Logprobs, top-k / top-p / min-p, grammar masks (bad words) or min_tokens bans in the
    plan: ordinary steps."""
    burst = engines[N]
    p = [5, 6, 7, 8]
    for sp in (SamplingParams(temperature=0.8, seed=1, top_p=0.9, max_tokens=12),
               SamplingParams(temperature=0.8, seed=1, top_k=5, max_tokens=12),
               SamplingParams(temperature=0.0, max_tokens=12, logprobs=1),
               SamplingParams(temperature=0.0, max_tokens=12, bad_words=["a"])):
        with _bursts(burst) as seen:
            run_engine(burst, [(p, sp), (p, SamplingParams(temperature=0.0, max_tokens=12))])
        assert set(seen) == {1}, sp
    with _bursts(burst) as seen:
        out = run_engine(burst, [(p, SamplingParams(temperature=0.0, max_tokens=12, min_tokens=6,
                                                    ignore_eos=True))])
    assert len(out[0].outputs[0].token_ids) == 12
    assert seen[:3] == [1, 1, 1] and N in seen   # bans first, bursts once min_tokens is reached


def test_pipelined_bursts_run_while_requests_wait(engines):
    """With ``pipelined_bursts`` (pipeline parallelism: a burst is how the stages overlap) a
    request arriving mid-run waits for the burst even with seats free, and is admitted after
    it; its tokens are what one step at a time gives."""
    burst = engines[N]
    greedy = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    items, late = [([5, 6, 7, 8], greedy), ([9, 10, 11], greedy)], [([12, 13], greedy)]
    want = [_summary(o) for o in _run(engines[1], items, late)]
    sched, plans = burst.scheduler, []
    plain = sched.schedule
    sched.schedule = lambda: plans.append((plain(), len(sched.waiting))) or plans[-1][0]
    sched.pipelined_bursts = True   # what the engine sets at pp > 1 (test only)
    try:
        got = [_summary(o) for o in _run(burst, items, late)]
    finally:
        sched.pipelined_bursts = False
        del sched.schedule
    assert got == want
    assert any(out.burst == N and waiting for out, waiting in plans)
    assert all(not (out.burst > 1 and any(c.start == 0 for c in out.chunks)) for out, _ in plans)


def test_pipelined_bursts_compile_plain_programs_for_two_buckets():
    """At pp > 1 (``pipelined_bursts``) bursts run the plain sampler (greedy rows argmax in it),
    compiled for the smallest bucket and the one holding ``max_num_seqs`` rows, which any larger
    burst pads up to; at pp = 1 the smallest bucket's greedy and plain-sampler bursts."""
    sched = SchedulerConfig(max_num_seqs=48, max_num_batched_tokens=128, num_scheduler_steps=4)
    pp = StepVariants(sched, pipelined_bursts=True)
    assert [(v.tokens, v.greedy) for v in pp.all() if v.burst > 1] == [(16, False), (64, False)]
    assert not pp.burst(4, True, 64).greedy
    assert [pp.bucket(n, lambda: False, 4) for n in (3, 16, 17, 48)] == [16, 16, 64, 64]
    assert pp.bucket(17, lambda: False) == 32   # an ordinary step keeps its own bucket
    one = StepVariants(sched)
    assert [(v.tokens, v.greedy) for v in one.all() if v.burst > 1] == [(16, True), (16, False)]


def test_option_checks():
    with pytest.raises(ValueError, match="num_scheduler_steps"):
        EngineArgs(num_scheduler_steps=0)
    spec = '{"method": "ngram", "num_speculative_tokens": 2}'
    args = EngineArgs(model="code-small", num_scheduler_steps=4, speculative_config=spec)
    model_cfg, _ = resolve_model(args)
    with pytest.raises(ValueError, match="num_scheduler_steps > 1 is not supported with speculative"):
        make_engine_config(args, model_cfg)


def test_aborts_mid_burst_lose_nothing_and_leak_nothing(engines):
    burst = engines[N]
    sp = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    rng = np.random.default_rng(5)
    prompts = [rng.integers(5, 500, n).tolist() for n in (6, 14, 9)]
    alone = [o.outputs[0].token_ids for o in run_engine(engines[1], [(p, sp) for p in prompts])]
    with _bursts(burst) as seen:
        ids = [burst.add_request(None, p, sp) for p in prompts]
        got: dict[str, list[int]] = {}
        for step in range(200):
            for out in burst.step():
                got[out.request_id] = out.outputs[0].token_ids
            if step == 3:   # a burst of it is in flight now
                burst.abort_request(ids[1])
            if not burst.has_unfinished_requests():
                break
    assert N in seen[:4]
    assert got[ids[0]] == alone[0] and got[ids[2]] == alone[2]
    assert got[ids[1]] == alone[1][:len(got[ids[1]])]
    burst.step()   # delivers the last drops to the runner
    stats = burst.stats()
    assert stats.num_running == stats.num_waiting == 0 and stats.kv_cache["pages_used"] == 0
    assert len(burst.runner.rows) == 0


def test_bursts_while_requests_wait_for_a_seat(engines):
    """With every ``max_num_seqs`` seat taken, a waiting request could not be admitted anyway:
    the running rows burst, and the waiting one starts when a seat frees (tokens as one step at
    a time). With a free seat, nothing bursts while a request waits."""
    burst = engines[N]
    sp = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in (9, 22, 14)]
    prompts = [[11, 12, 13], [21, 22, 23, 24, 25], [31, 32]]
    items = list(zip(prompts, sp, strict=True))
    want = [o.outputs[0].token_ids for o in run_engine(engines[1], items)]
    sched, seen = burst.scheduler, []
    config, plain = sched.config, sched.schedule

    def schedule():
        out = plain()
        seen.append((out.burst, len(sched.waiting), len(sched.running)))
        return out

    sched.config = dataclasses.replace(config, max_num_seqs=2)   # two seats (test only)
    sched.schedule = schedule
    try:
        got = [o.outputs[0].token_ids for o in run_engine(burst, items)]
    finally:
        sched.config = config
        del sched.schedule
    assert got == want
    assert any(b == N and w > 0 for b, w, _ in seen)   # a burst while the third request waited
    assert all(b == 1 for b, w, r in seen if w and r < 2)


def test_a_last_burst_overshoots_max_tokens_and_emits_exactly_them(engines):
    """With N - N // 4 tokens left a row still bursts: the burst computes one token past
    ``max_tokens``, the row emits exactly ``max_tokens`` (usage, finish reason "length") and
    frees every page; with fewer left it steps one at a time."""
    burst = engines[N]
    tail = N - N // 4                 # 3 of N = 4: the last burst computes one token too many
    items = [([41, 42, 43, 44], SamplingParams(temperature=0.0, max_tokens=1 + N + tail, ignore_eos=True))]
    want = run_engine(engines[1], items)[0].outputs[0]
    free = burst.scheduler.pool.num_free
    with _bursts(burst) as seen:
        got = run_engine(burst, items)[0].outputs[0]
    assert (got.token_ids, got.finish_reason) == (want.token_ids, "length")
    assert len(got.token_ids) == 1 + N + tail
    assert seen.count(N) == 2          # the prefill's token, a full burst, the overshooting one
    assert burst.scheduler.pool.num_free == free
    short = [(items[0][0], dataclasses.replace(items[0][1], max_tokens=1 + N + tail - 1))]
    with _bursts(burst) as seen:
        got = run_engine(burst, short)[0].outputs[0]
    assert len(got.token_ids) == N + tail and seen.count(N) == 1


def test_a_tight_pool_falls_back_to_single_steps(make_engine):
    """Without pages for N more positions of every row a plan is not a burst (bursts never
    preempt); with preemption in the ordinary steps the tokens still equal a roomy engine's."""
    sp = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    prompts = [[7 + i, 8, 9, 10, 11] for i in range(4)]
    want = [o.outputs[0].token_ids for o in run_engine(make_engine("llama"), [(p, sp) for p in prompts])]
    tight = make_engine("llama", num_scheduler_steps=N, num_pages=12)
    with _bursts(tight) as seen:
        got = [o.outputs[0].token_ids for o in run_engine(tight, [(p, sp) for p in prompts])]
    assert got == want
    assert N in seen and 1 in seen
    assert tight.scheduler.num_preemptions_total > 0


def test_the_llm_api_and_the_generate_flag_take_it(xla_cache_dir):
    """``LLM(num_scheduler_steps=...)`` and ``jserve generate --num-scheduler-steps`` reach the
    engine; the LLM's greedy output equals one step at a time."""
    common = dict(model=str(GOLDEN / "llama"), dtype="float32", max_model_len=128, max_num_seqs=8,
                  max_num_batched_tokens=64, num_pages=80, compilation_cache_dir=xla_cache_dir)
    sp = SamplingParams(temperature=0.0, max_tokens=18, ignore_eos=True)
    prompts = [[5, 6, 7], [8, 9, 10, 11]]
    outs = {n: LLM(**common, num_scheduler_steps=n).generate(
        [{"prompt_token_ids": p} for p in prompts], sp) for n in (1, 4)}
    assert [o.outputs[0].token_ids for o in outs[4]] == [o.outputs[0].token_ids for o in outs[1]]
    ns = build_parser().parse_args(["generate", "--num-scheduler-steps", "4"])
    assert engine_args_from(ns).num_scheduler_steps == 4
