"""HTTP with bursts on (``num_scheduler_steps``): a server over the tiny golden engine running up
to 4 decode steps per device program answers as the shared server does: completions streamed
and not (tokens, text, finish, usage), chat, seeded sampling with ``n`` > 1, a stop string
inside a burst; the ``serve`` flag reaches the engine arguments."""

from __future__ import annotations

import pytest
from e2e_server import ENGINE_ARGS, ServerThread, assert_same_greedy_completions

from jserve.async_engine import AsyncEngine
from server.metrics import PrometheusStats

openai = pytest.importorskip("openai")

PROMPTS = ["Hello, my name is", "The capital of France is", "def fib(n):"]
TOKENS = {"return_token_ids": True, "ignore_eos": True}


@pytest.fixture(scope="module")
def burst_oai(make_engine):
    args = {k: v for k, v in ENGINE_ARGS.items() if k != "model"}
    engine = make_engine("llama", **args, num_scheduler_steps=4)
    stats = PrometheusStats.for_engine("llama", engine)
    srv = ServerThread(AsyncEngine(engine, stats), stats)
    yield openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, timeout=60)
    srv.close()


def _model(client):
    return client.models.list().data[0].id


def test_completions_match_one_step_at_a_time(oai, burst_oai):
    ref = assert_same_greedy_completions(oai, burst_oai, PROMPTS, 22, TOKENS)   # streamed too
    # a stop string that a burst passes: never emitted past it, the same text as without bursts
    stop = ref.choices[1].text[6:10]
    kw = dict(prompt=PROMPTS[1], max_tokens=22, temperature=0.0, stop=[stop])
    assert burst_oai.completions.create(model=_model(burst_oai), **kw).choices[0].text == \
        oai.completions.create(model=_model(oai), **kw).choices[0].text


def test_chat_and_seeded_sampling_match(oai, burst_oai):
    messages = [{"role": "user", "content": "Tell me a story about a cat."}]
    kw = dict(messages=messages, max_tokens=16, temperature=0.0)
    ref = oai.chat.completions.create(model=_model(oai), **kw).choices[0]
    got = burst_oai.chat.completions.create(model=_model(burst_oai), **kw).choices[0]
    assert (got.message.content, got.finish_reason) == (ref.message.content, ref.finish_reason)
    kw = dict(prompt=PROMPTS[2], max_tokens=14, temperature=0.9, seed=7, n=2, extra_body=TOKENS)
    ref = oai.completions.create(model=_model(oai), **kw)
    got = burst_oai.completions.create(model=_model(burst_oai), **kw)
    assert sorted(c.model_extra["token_ids"] for c in got.choices) == \
        sorted(c.model_extra["token_ids"] for c in ref.choices)


def test_serve_flag_reaches_the_engine_args():
    from jserve.cli import engine_args_from
    from server.cli import build_full_parser

    ns = build_full_parser().parse_args(["serve", "--num-scheduler-steps", "8"])
    assert engine_args_from(ns).num_scheduler_steps == 8
    with pytest.raises(SystemExit):
        build_full_parser().parse_args(["serve", "--num-scheduler-steps", "0"])
