"""Tool-call parsers (Hermes, Llama-3.1 JSON), the streaming hold-back, tool_choice parsing and
the forced-call grammars: no engine."""

from __future__ import annotations

import json

import pytest

from server.errors import APIError
from server.tool_calls import NAMED, REQUIRED, forced_calls, parse_tools, shape_message
from server.tool_parsers import StreamingToolText, get_tool_parser

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                          "required": ["city"]}}},
         {"type": "function", "function": {"name": "now"}}]


def test_hermes_extracts_calls_and_content():
    p = get_tool_parser("hermes")
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
            '</tool_call>\n<tool_call>{"name": "now", "arguments": {}}</tool_call>')
    content, calls = p.extract(text)
    assert content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"}),
                                                                 ("now", {})]
    assert p.extract("no calls here") == ("no calls here", [])
    assert p.extract("<tool_call>{not json</tool_call>")[1] == []


def test_llama3_json_extracts_calls():
    p = get_tool_parser("llama3_json")
    content, calls = p.extract('<|python_tag|>{"name": "now", "parameters": {}}; '
                               '{"name": "get_weather", "parameters": {"city": "Rome"}}')
    assert content is None and [c.name for c in calls] == ["now", "get_weather"]
    assert p.extract("The weather is fine.") == ("The weather is fine.", [])
    assert p.extract('{"not": "a call"}')[1] == []


@pytest.mark.parametrize("name,text", [
    ("hermes", 'Sure. <tool_call>{"name": "now", "arguments": {}}</tool_call>'),
    ("llama3_json", '{"name": "now", "parameters": {}}'),
    ("hermes", "plain text with a < sign and <tool no call"),
])
def test_streaming_sends_content_early_and_calls_at_the_end(name, text):
    parser = get_tool_parser(name)
    s = StreamingToolText(parser)
    sent = "".join(s.feed(text[i:i + 3]) for i in range(0, len(text), 3))
    rest, calls = s.finish()
    want_content, want_calls = parser.extract(text)
    assert calls == want_calls
    if calls:
        assert (sent + rest).strip() == (want_content or "")
        assert "<tool_call>" not in sent and "{" not in sent
    else:
        assert sent + rest == text


def test_tool_choice_parsing():
    assert parse_tools({}, None) is None
    assert parse_tools({"tools": TOOLS}, None).mode == "none"        # no parser: auto off
    assert parse_tools({"tools": TOOLS}, "hermes").mode == "auto"
    with pytest.raises(APIError) as e:
        parse_tools({"tools": TOOLS, "tool_choice": "auto"}, None)
    assert e.value.param == "tool_choice" and "--tool-call-parser" in e.value.message
    named = parse_tools({"tools": TOOLS, "tool_choice": {"type": "function",
                                                        "function": {"name": "get_weather"}}}, None)
    assert named.mode == NAMED and named.structured_outputs() == {"json": TOOLS[0]["function"]["parameters"]}
    with pytest.raises(APIError) as e:
        parse_tools({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "x"}}}, None)
    assert e.value.param == "tool_choice"
    with pytest.raises(APIError) as e:
        parse_tools({"tools": [{"type": "function", "function": {}}]}, None)
    assert e.value.param == "tools[0].function"
    with pytest.raises(APIError):
        parse_tools({"tool_choice": "required"}, None)


def test_forced_calls_and_message_shape():
    req = parse_tools({"tools": TOOLS, "tool_choice": "required"}, None)
    assert req.mode == REQUIRED
    schema = req.structured_outputs()["json"]
    assert schema["type"] == "array" and schema["minItems"] == 1
    text = '[{"name": "get_weather", "parameters": {"city": "Oslo"}}]'
    (call,) = forced_calls(req, text)
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Oslo"}
    msg, finish = shape_message(req, None, text, "stop")
    assert finish == "tool_calls" and msg["content"] is None
    assert msg["tool_calls"][0]["function"]["name"] == "get_weather"
    assert msg["tool_calls"][0]["id"].startswith("chatcmpl-tool-")
    msg, finish = shape_message(req, None, '[{"name": "get_wea', "length")   # cut short
    assert finish == "length" and "tool_calls" not in msg
