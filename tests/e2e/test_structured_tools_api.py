"""Structured outputs and tool calling over HTTP with the official ``openai`` client, streaming
and not: response_format json_schema / json_object, vLLM's structured_outputs and guided_*,
logit_bias / allowed_token_ids, tool_choice required / named / auto (hermes parser), bad
schemas as 400s naming what is wrong. One server with ``--tool-call-parser hermes``."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
from e2e_server import ENGINE_ARGS, MODEL, ServerThread

from jserve.async_engine import AsyncEngine

openai = pytest.importorskip("openai")

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 9}},
          "required": ["name", "n"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}},
                   "required": ["city"], "additionalProperties": False}}},
         {"type": "function", "function": {"name": "now", "parameters": {
             "type": "object", "properties": {}, "additionalProperties": False}}}]
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(make_engine):
    eng = make_engine("llama", **{k: v for k, v in ENGINE_ARGS.items() if k != "model"})
    srv = ServerThread(AsyncEngine(eng), tool_call_parser="hermes")
    yield srv
    srv.close()


@pytest.fixture
def oai(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=120)


def test_response_format_json_schema_chat_and_completions(oai):
    rf = {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA, "strict": True}}
    chat = oai.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=40,
                                       temperature=0.8, seed=1, n=2, response_format=rf)
    for c in chat.choices:
        jsonschema.validate(json.loads(c.message.content), SCHEMA)
    stream = oai.completions.create(model=MODEL, prompt="def f(x):", max_tokens=40, temperature=0,
                                    stream=True, extra_body={"response_format": rf})
    text = "".join(ch.choices[0].text for ch in stream if ch.choices)
    jsonschema.validate(json.loads(text), SCHEMA)
    obj = oai.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=60, temperature=0,
                                      response_format={"type": "json_object"})
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(obj.choices[0].message.content), dict)


def test_vllm_fields_and_token_masks(oai):
    c = oai.completions.create(model=MODEL, prompt="x", max_tokens=10, temperature=0,
                               extra_body={"guided_choice": ["red", "green"]})
    assert c.choices[0].text in ("red", "green")
    c = oai.completions.create(model=MODEL, prompt="x", max_tokens=20, temperature=0,
                               extra_body={"structured_outputs": {"regex": "[0-9]{3}-[a-c]+"}})
    assert re.fullmatch("[0-9]{3}-[a-c]+", c.choices[0].text)
    c = oai.completions.create(model=MODEL, prompt="x", max_tokens=4, temperature=0,
                               logit_bias={"9": 100}, extra_body={"ignore_eos": True,
                                                                  "return_token_ids": True})
    assert c.choices[0].model_extra["token_ids"] == [9] * 4
    c = oai.completions.create(model=MODEL, prompt="x", max_tokens=4, temperature=1.0,
                               extra_body={"allowed_token_ids": [5, 6], "ignore_eos": True,
                                           "return_token_ids": True})
    assert set(c.choices[0].model_extra["token_ids"]) <= {5, 6}


def test_bad_schema_is_a_400_naming_the_problem(oai):
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5, response_format={
            "type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "strin"}}})
    assert e.value.body["param"] == "response_format" and "strin" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model=MODEL, prompt="x", max_tokens=5, extra_body={"guided_regex": "a("})
    assert e.value.body["param"] == "guided_regex"
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model=MODEL, prompt="x", max_tokens=5,
                               extra_body={"guided_regex": "a", "guided_choice": ["b"]})
    assert "at most one" in e.value.body["message"]


def _args(call):
    return call.function.name, json.loads(call.function.arguments)


def test_tool_choice_required_and_named(oai):
    r = oai.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, max_tokens=60,
                                    temperature=0, tool_choice="required")
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.tool_calls
    for call in c.message.tool_calls:
        name, args = _args(call)
        assert name in ("get_weather", "now") and isinstance(args, dict)
    streamed, finish = [], None
    for ch in oai.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, max_tokens=60,
                                          temperature=0, tool_choice="required", stream=True):
        if ch.choices:
            streamed += ch.choices[0].delta.tool_calls or []
            finish = ch.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert [_args(x) for x in streamed] == [_args(x) for x in c.message.tool_calls]
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = oai.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, max_tokens=30,
                                    temperature=0, tool_choice=named)
    (call,) = r.choices[0].message.tool_calls
    assert _args(call)[0] == "get_weather" and _args(call)[1]["city"] in ("Paris", "Rome")
    # streamed: the arguments arrive as deltas of one call
    parts, names = [], []
    for ch in oai.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, max_tokens=30,
                                          temperature=0, tool_choice=named, stream=True):
        for d in (ch.choices[0].delta.tool_calls or []) if ch.choices else []:
            assert d.index == 0
            names.append(d.function.name)
            parts.append(d.function.arguments or "")
    assert names[0] == "get_weather" and json.loads("".join(parts)) == _args(call)[1]


def test_tool_choice_auto_parses_hermes_calls_whole_and_streamed(oai):
    forced = r'<tool_call>\{"name": "get_weather", "arguments": \{"city": "(Paris|Rome)"\}\}</tool_call>'
    body = dict(model=MODEL, messages=MESSAGES, tools=TOOLS, max_tokens=60, temperature=0,
                tool_choice="auto", extra_body={"guided_regex": forced})
    r = oai.chat.completions.create(**body)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls"
    (call,) = c.message.tool_calls
    assert _args(call)[0] == "get_weather"
    calls, content = [], ""
    finish = None
    for ch in oai.chat.completions.create(**body, stream=True):
        if not ch.choices:
            continue
        d = ch.choices[0].delta
        content += d.content or ""
        calls += d.tool_calls or []
        finish = ch.choices[0].finish_reason or finish
    assert finish == "tool_calls" and "<tool_call>" not in content
    assert [(x.function.name, json.loads(x.function.arguments)) for x in calls] == [_args(call)]
    plain = oai.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, max_tokens=5,
                                        temperature=0)
    assert plain.choices[0].message.tool_calls is None  # free text: no calls found


def test_tool_conversation_round_trip(oai):
    msgs = MESSAGES + [
        {"role": "assistant", "content": "", "tool_calls": [  # this template needs a string
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    r = oai.chat.completions.create(model=MODEL, messages=msgs, tools=TOOLS, max_tokens=5, temperature=0,
                                    tool_choice="none")
    assert r.choices[0].message.tool_calls is None


def test_grpc_structured_outputs_and_masks(server):
    grpc = pytest.importorskip("grpc")
    from server.proto import jserve_pb2 as pb
    from server.proto import jserve_pb2_grpc as pb_grpc

    with grpc.insecure_channel(server.grpc_target) as ch:
        stub = pb_grpc.GenerationStub(ch)

        def text(**sp):
            req = pb.GenerateRequest(text="def f(x):", sampling_params=pb.SamplingParams(
                max_tokens=40, temperature=0.0, **sp))
            return "".join(c.text for r in stub.Generate(req, timeout=120) for c in r.choices)

        jsonschema.validate(json.loads(text(structured_outputs=pb.StructuredOutputs(
            json=json.dumps(SCHEMA)))), SCHEMA)
        assert text(structured_outputs=pb.StructuredOutputs(
            choice=pb.Choices(values=["yes", "no"]))) in ("yes", "no")
        assert re.fullmatch("[a-c]{2}[0-9]", text(structured_outputs=pb.StructuredOutputs(
            regex="[a-c]{2}[0-9]")))
        with pytest.raises(grpc.RpcError) as e:
            text(structured_outputs=pb.StructuredOutputs(json='{"type": "strin"}'))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "strin" in e.value.details()
        req = pb.GenerateRequest(text="x", sampling_params=pb.SamplingParams(
            max_tokens=4, temperature=0.0, ignore_eos=True, logit_bias={9: 100.0}))
        ids = [t for r in stub.Generate(req, timeout=120) for c in r.choices for t in c.token_ids]
        assert ids == [9] * 4
