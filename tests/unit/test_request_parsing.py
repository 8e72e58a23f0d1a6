"""Request bodies: every field is honoured or refused by name, and the JSON decoder's limits.

No server: ``parse_json_body`` and the ``parse_*`` functions raise ``APIError`` directly.
"""

from __future__ import annotations

import json

import pytest

from server.errors import APIError
from server.json_body import MAX_INT_DIGITS, MAX_JSON_DEPTH, parse_json_body
from server.protocol import parse_chat_request, parse_completion_request
from server.request_fields import CHAT, COMPLETIONS, HONOURED, NO_SEMANTICS, NOT_SUPPORTED

PARSERS = {COMPLETIONS: parse_completion_request, CHAT: parse_chat_request}
BASE = {COMPLETIONS: {"prompt": "hi"}, CHAT: {"messages": [{"role": "user", "content": "hi"}]}}
WRONG = [[[]]]        # a value no field accepts


def _error(endpoint: str, **fields) -> APIError:
    with pytest.raises(APIError) as e:
        PARSERS[endpoint]({**BASE[endpoint], **fields})
    assert e.value.status == 400
    return e.value


@pytest.mark.parametrize("endpoint", [COMPLETIONS, CHAT])
def test_every_honoured_field_is_read_and_checked(endpoint):
    """A wrong value in any honoured field is a 400 naming it: none of them is ignored."""
    for name in sorted(HONOURED[endpoint]):
        fields = {name: WRONG}
        if name == "stream_options":
            fields["stream"] = True
        err = _error(endpoint, **fields)
        assert err.param == name or (err.param or "").startswith(name + "["), (name, err.message)


@pytest.mark.parametrize("endpoint", [COMPLETIONS, CHAT])
def test_unsupported_fields_are_refused_by_name_unless_they_ask_for_nothing(endpoint):
    active = {"response_format": {"type": "json_object"}, "use_beam_search": True, "logit_bias": {"5": 1},
              "continue_final_message": True, "prompt_logprobs": 0, "truncate_prompt_tokens": 8}
    for name in NOT_SUPPORTED:
        err = _error(endpoint, **{name: active.get(name, ["x"])})
        assert err.param == name and name in err.message
        for nothing in (None, False, [], {}):
            PARSERS[endpoint]({**BASE[endpoint], name: nothing})
    PARSERS[endpoint]({**BASE[endpoint], "response_format": {"type": "text"}})


@pytest.mark.parametrize("endpoint", [COMPLETIONS, CHAT])
def test_openai_fields_without_semantics_are_accepted(endpoint):
    values = {"user": "u", "metadata": {"a": "b"}, "store": True, "service_tier": "auto",
              "parallel_tool_calls": False}
    assert set(values) == NO_SEMANTICS
    PARSERS[endpoint]({**BASE[endpoint], **values})


def test_unknown_field_is_refused_with_a_hint():
    err = _error(COMPLETIONS, max_token=5)
    assert err.param == "max_token" and "did you mean 'max_tokens'" in err.message


def test_param_is_the_field_the_client_sent():
    assert _error(CHAT, max_completion_tokens=-3).param == "max_completion_tokens"
    assert _error(CHAT, max_tokens=0).param == "max_tokens"
    assert _error(COMPLETIONS, n=3, temperature=0).param == "n"
    assert _error(CHAT, messages=[{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]
                  ).param == "messages[1].role"


def test_json_depth_limit():
    d = MAX_JSON_DEPTH - 1
    ok = {"prompt": "hi", "chat_template_kwargs": json.loads("[" * d + "]" * d)}
    assert parse_json_body(json.dumps(ok).encode()) == ok
    deep = b'{"a": ' + b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH + b"}"
    with pytest.raises(APIError) as e:
        parse_json_body(deep)
    assert e.value.status == 400 and e.value.param.startswith("a[0]")
    with pytest.raises(APIError) as e:
        parse_json_body(b"[" * 200_000 + b"]" * 200_000)
    assert e.value.status == 400


@pytest.mark.parametrize("body, param", [
    (b'{"prompt": "a\\ud800"}', "prompt"),
    (b'{"prompt": "a\xed\xa0\x80"}', "prompt"),
    (b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}',
     "messages[0].content[0].text"),
    (b'{"metadata": {"\\ud800": 1}}', "metadata.\ud800"),
    (b'{"max_tokens": ' + b"1" * (MAX_INT_DIGITS + 1) + b"}", "max_tokens"),
    (b'{"stop_token_ids": [1, 2, -' + b"3" * 5000 + b"]}", "stop_token_ids[2]"),
])
def test_bad_text_and_numbers_name_the_path(body, param):
    with pytest.raises(APIError) as e:
        parse_json_body(body)
    assert e.value.status == 400 and e.value.param == param
    assert "4300" not in e.value.message


@pytest.mark.parametrize("body", [b"NaN", b'{"t": Infinity}', b'{"t": -Infinity}', b"\xff", b"[1]", b""])
def test_not_a_clean_json_object(body):
    with pytest.raises(APIError) as e:
        parse_json_body(body)
    assert e.value.status == 400
