"""HTTP and gRPC with speculative decoding on (n-gram drafts, and a draft model).

A server over the tiny golden engine with ``speculative_config`` answers the same greedy
requests with the same tokens as the shared server without speculation: completions and chat,
streamed and not, logprobs, stop strings, structured outputs, gRPC; sampled ``n`` > 1 is
seeded (streamed equals non-streamed); ``/metrics`` exports the spec-decode counters; the
``serve`` flag reaches the engine arguments. The speculative engines have the shapes of the
unit tests' (tests/unit/test_spec_engine.py, test_spec_draft.py): the compile cache serves them.
"""

from __future__ import annotations

import json

import grpc
import httpx
import pytest
from e2e_server import ENGINE_ARGS, ServerThread, assert_same_greedy_completions, streamed_completion
from fixture_paths import GOLDEN

from jserve.async_engine import AsyncEngine
from server.metrics import PrometheusStats
from server.proto import jserve_pb2 as pb
from server.proto import jserve_pb2_grpc as pb_grpc

openai = pytest.importorskip("openai")

NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "disable_by_batch_size": None,
         "prompt_lookup_min": 1,
         "prompt_lookup_max": 3}
DRAFT = {"method": "draft_model", "model": str(GOLDEN / "llama"), "num_speculative_tokens": 3,
         "disable_by_batch_size": None}
PROMPTS = ["Hello, my name is", "The capital of France is", "def fib(n):"]
MESSAGES = [{"role": "user", "content": "Tell me a story about a cat."}]
TOKENS = {"return_token_ids": True, "ignore_eos": True}


@pytest.fixture(scope="module", params=["ngram", "draft_model"])
def spec_served(request, make_engine):
    args = {k: v for k, v in ENGINE_ARGS.items() if k != "model"}
    if request.param == "ngram":
        engine = make_engine("llama", **args, speculative_config=NGRAM)
    else:   # the unit tests' draft-model shape (a small pool, swap space)
        engine = make_engine("llama", **{**args, "num_pages": 24, "swap_space_gb": 0.001},
                             speculative_config=DRAFT)
    stats = PrometheusStats.for_engine("llama", engine)
    srv = ServerThread(AsyncEngine(engine, stats), stats)
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def spec_oai(spec_served):
    return openai.OpenAI(base_url=f"{spec_served.url}/v1", api_key="unused", max_retries=0, timeout=60)


def _model(client):
    return client.models.list().data[0].id


def _complete(client, **kw):
    return client.completions.create(model=_model(client), **kw)


def test_greedy_completions_match_no_speculation(oai, spec_oai, spec_served):
    assert_same_greedy_completions(oai, spec_oai, PROMPTS, 24, TOKENS)   # streamed too
    # drafts were verified on this server
    metrics = httpx.get(f"{spec_served.url}/metrics").text
    line = next(x for x in metrics.splitlines()
                if x.startswith("jserve:spec_decode_num_draft_tokens_total{"))
    assert float(line.split()[-1]) > 0


def test_chat_streamed_and_not_match_no_speculation(oai, spec_oai):
    kw = dict(messages=MESSAGES, max_tokens=16, temperature=0.0)
    ref = oai.chat.completions.create(model=_model(oai), **kw).choices[0]
    full = spec_oai.chat.completions.create(model=_model(spec_oai), **kw).choices[0]
    assert (full.message.content, full.finish_reason) == (ref.message.content, ref.finish_reason)
    chunks = list(spec_oai.chat.completions.create(model=_model(spec_oai), stream=True, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.message.content


def test_logprobs_match_no_speculation(oai, spec_oai):
    kw = dict(prompt=PROMPTS[1], max_tokens=12, temperature=0.0, logprobs=3, extra_body=TOKENS)
    ref = _complete(oai, **kw).choices[0]
    got = _complete(spec_oai, **kw).choices[0]
    assert got.model_extra["token_ids"] == ref.model_extra["token_ids"]
    assert got.logprobs.tokens == ref.logprobs.tokens
    assert got.logprobs.token_logprobs == pytest.approx(ref.logprobs.token_logprobs, abs=1e-5)
    for a, b in zip(got.logprobs.top_logprobs, ref.logprobs.top_logprobs, strict=True):
        assert a.keys() == b.keys()
        assert list(a.values()) == pytest.approx(list(b.values()), abs=1e-5)


def test_stop_strings_streamed_and_not(oai, spec_oai):
    kw = dict(prompt=PROMPTS[2], max_tokens=30, temperature=0.0, extra_body=TOKENS)
    text = _complete(oai, **kw).choices[0].text
    stop = text[8:11]
    assert len(stop) == 3, f"need a longer greedy text to pick a stop string from: {text!r}"
    ref = _complete(oai, stop=[stop], **kw).choices[0]
    assert ref.text == text[:text.index(stop)]
    got = _complete(spec_oai, stop=[stop], **kw).choices[0]
    assert (got.text, got.finish_reason, got.model_extra["stop_reason"]) == (ref.text, "stop", stop)
    assert got.model_extra["token_ids"] == ref.model_extra["token_ids"]
    s_text, s_ids, s_finish, _ = streamed_completion(spec_oai, stop=[stop], **kw)
    assert (s_text, s_ids, s_finish) == (ref.text, ref.model_extra["token_ids"], "stop")


def test_sampled_n2_is_seeded_streamed_and_not(spec_oai):
    kw = dict(prompt=PROMPTS[0], n=2, temperature=1.0, seed=5, max_tokens=12, extra_body=TOKENS)
    r = _complete(spec_oai, **kw)
    got = {c.index: c.model_extra["token_ids"] for c in r.choices}
    assert sorted(got) == [0, 1] and all(len(t) == 12 for t in got.values())
    assert got[0] != got[1] and r.usage.completion_tokens == 24
    streamed = {0: [], 1: []}
    for chunk in spec_oai.completions.create(model=_model(spec_oai), stream=True, **kw):
        for c in chunk.choices:
            streamed[c.index] += c.model_extra.get("token_ids") or []
    assert streamed == got


def test_structured_output_matches_no_speculation(oai, spec_oai):
    schema = {"type": "object",
              "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                             "b": {"enum": ["x", "yy"]}},
              "required": ["a", "b"], "additionalProperties": False}
    kw = dict(messages=MESSAGES, max_tokens=40, temperature=0.0,
              response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}})
    ref = oai.chat.completions.create(model=_model(oai), **kw).choices[0]
    got = spec_oai.chat.completions.create(model=_model(spec_oai), **kw).choices[0]
    assert (got.message.content, got.finish_reason) == (ref.message.content, ref.finish_reason)
    assert got.finish_reason == "stop"
    assert set(json.loads(got.message.content)) == {"a", "b"}


def _grpc(target, **kw):
    with grpc.insecure_channel(target) as ch:
        return list(pb_grpc.GenerationStub(ch).Generate(pb.GenerateRequest(**kw), timeout=60))


def _grpc_tokens(msgs, index=0):
    return [t for m in msgs for c in m.choices if c.index == index for t in c.token_ids]


def test_grpc_matches_no_speculation(served, spec_served):
    sp = pb.SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, logprobs=2)
    ref = _grpc(served.grpc_target, text=PROMPTS[0], sampling_params=sp)
    got = _grpc(spec_served.grpc_target, text=PROMPTS[0], sampling_params=sp)
    assert _grpc_tokens(got) == _grpc_tokens(ref)
    assert "".join(c.text for m in got for c in m.choices) == "".join(c.text for m in ref for c in m.choices)
    lps = [lp.logprob for m in got for c in m.choices for lp in c.logprobs]
    assert lps == pytest.approx([lp.logprob for m in ref for c in m.choices for lp in c.logprobs],
                                abs=1e-5)
    assert got[-1].usage.completion_tokens == 20
    # n = 2 sampled, with a stop string: seeded, both choices end
    text = "".join(c.text for m in ref for c in m.choices)
    stop = text[6:9]
    sp = pb.SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=20, ignore_eos=True)
    a = _grpc(spec_served.grpc_target, text=PROMPTS[0], sampling_params=sp)
    b = _grpc(spec_served.grpc_target, text=PROMPTS[0], sampling_params=sp)
    assert [_grpc_tokens(a, i) for i in (0, 1)] == [_grpc_tokens(b, i) for i in (0, 1)]
    sp = pb.SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, stop=[stop])
    msgs = _grpc(spec_served.grpc_target, text=PROMPTS[0], sampling_params=sp)
    assert "".join(c.text for m in msgs for c in m.choices) == text[:text.index(stop)]
    assert msgs[-1].choices[-1].finish_reason == "stop"


def test_serve_flag_reaches_the_engine_args():
    from jserve.cli import engine_args_from
    from server.cli import build_full_parser

    ns = build_full_parser().parse_args(["serve", "--speculative-config", json.dumps(NGRAM)])
    assert json.loads(engine_args_from(ns).speculative_config) == NGRAM
    with pytest.raises(SystemExit):
        build_full_parser().parse_args(["serve", "--speculative-config", '{"method": "medusa"}'])


def test_bench_reports_acceptance_from_the_servers_metrics(spec_served, tmp_path, capsys):
    """``jserve bench`` against a speculating server: each run's acceptance rate and mean accepted
    length, from the server's counters before and after it (server/bench_spec.py)."""
    from server.cli import main

    data = tmp_path / "prompts.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": p * 4, "output_len": 16}) for p in PROMPTS) + "\n")
    out = tmp_path / "bench.json"
    assert main(["bench", "--base-url", spec_served.url, "--dataset", str(data), "--num-prompts", "3",
                 "--concurrency", "1,2", "--result-json", str(out)]) == 0
    runs = json.loads(out.read_text())["runs"]
    for run in runs:
        s = run["spec_decode"]
        assert s["draft_tokens"] > 0 and s["verify_rows"] > 0
        assert 0.0 <= s["acceptance_rate"] <= 1.0
        assert 1.0 <= s["mean_accepted_length"] <= 1 + 3   # k = 3
    assert "speculative decoding: acceptance rate" in capsys.readouterr().out
    # a server without speculation reports none
    from server.bench_spec import parse_spec_counters, spec_summary

    assert parse_spec_counters("jserve:num_requests_running 0\n") is None
    assert spec_summary(None, {"x": 1.0}) is None
