"""Every request field with values of every wrong type: a 4xx naming the problem or a normal
answer, never a 5xx, an engine error or a lost request (DESIGN: no client input causes a 500).

For each endpoint, each field it honours (server/request_fields.py), accepts without effect or
refuses by name is sent alone on top of a minimal valid body with each of a few hostile values
(null, a bool, negative and huge numbers, a string, nested lists and objects). Valid-looking
ones generate one token. Then seeded random sweeps go deeper: hostile values at any depth of a
rich valid body (messages with content parts, tool calls, tools, response formats), streamed
or not, and random gRPC sampling parameters at their types' limits. The table-driven cases of
test_bad_input.py check the exact statuses and messages of known mistakes; this sweeps the
rest. One server (HTTP and gRPC) over the tiny golden llama.
"""

from __future__ import annotations

import copy
import logging
import random
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import pytest
from e2e_server import ENGINE_ARGS, ServerThread
from google.protobuf.descriptor import FieldDescriptor

from jserve.async_engine import AsyncEngine
from server.proto import jserve_pb2 as pb
from server.proto import jserve_pb2_grpc as pb_grpc
from server.request_fields import (
    CHAT,
    COMPLETIONS,
    DETOKENIZE,
    HONOURED,
    NO_SEMANTICS,
    NOT_SUPPORTED,
    TOKENIZE,
)

HOSTILE = (None, True, -2**63, 1e308, "x", [None, {"a": [1, {"b": None}]}])
BASE = {
    COMPLETIONS: ("/v1/completions", {"prompt": "hello", "max_tokens": 1, "temperature": 0.0}),
    CHAT: ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}),
    TOKENIZE: ("/tokenize", {"prompt": "hello"}),
    DETOKENIZE: ("/detokenize", {"tokens": [5, 6]}),
}


@pytest.fixture(scope="module")
def server(make_engine):
    engine = make_engine("llama", **{k: v for k, v in ENGINE_ARGS.items() if k != "model"})
    srv = ServerThread(AsyncEngine(engine))
    yield srv
    srv.close()


@pytest.mark.parametrize("endpoint", list(BASE))
def test_hostile_values_of_every_field_never_cause_a_5xx(server, endpoint, caplog):
    path, base = BASE[endpoint]
    fields = sorted(HONOURED[endpoint] | NO_SEMANTICS | set(NOT_SUPPORTED))
    seen: dict[int, int] = {}
    with caplog.at_level(logging.INFO), httpx.Client(base_url=server.url, timeout=60) as client:
        for field in fields:
            for value in HOSTILE:
                body = {**base, field: value}
                r = client.post(path, json=body)
                seen[r.status_code] = seen.get(r.status_code, 0) + 1
                assert r.status_code < 500, (field, value, r.text)
                if r.status_code >= 400:
                    err = r.json()["error"]
                    assert err["code"] == r.status_code and err["message"], (field, value, err)
                    assert "Traceback" not in err["message"], (field, value, err)
        r = client.post(path, json=base)   # still serving
        assert r.status_code == 200, r.text
    assert seen.get(400, 0) > 0 and seen.get(200, 0) > 0, seen   # both outcomes exercised
    assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR], caplog.text


DEEP = (None, True, 0, -1, 2**31, -2**63, 1e308, 0.5, "", "x", "\x00", "a" * 300, [], [None], [1, 2],
        {}, {"a": {"b": []}}, {"type": "text", "text": "hi"},
        [{"type": "image_url", "image_url": {"url": "x"}}])
CALL = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
TOOL = {"type": "function", "function": {"name": "f", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}}}}}
RICH = (
    ("/v1/chat/completions", {
        "messages": [{"role": "system", "content": "be brief"},
                     {"role": "user", "content": [{"type": "text", "text": "hi"}]},
                     {"role": "assistant", "content": "", "tool_calls": [CALL]},
                     {"role": "tool", "tool_call_id": "c1", "content": "ok"}],
        "max_tokens": 2, "tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "f"}},
        "logit_bias": {"5": 1.0}, "stop": ["a"], "logprobs": True, "top_logprobs": 2, "seed": 1}),
    ("/v1/chat/completions", {
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "n": 2, "temperature": 0.5,
        "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {
            "type": "object", "properties": {"k": {"enum": ["a", "b"]}}}}}}),
    ("/v1/completions", {
        "prompt": ["hi", "yo"], "max_tokens": 2, "logprobs": 2, "echo": True, "stop": "x", "n": 2,
        "best_of": 2, "logit_bias": {"3": -100}, "seed": 3, "response_format": {"type": "json_object"}}),
)


def _paths(node: Any, at: tuple = ()) -> Iterator[tuple]:
    """Every place in a JSON body (dict keys and list indices), the root excluded."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        yield (*at, key)
        yield from _paths(child, (*at, key))


def _put(body: dict, at: tuple, value: Any) -> None:
    for key in at[:-1]:
        body = body[key]
    body[at[-1]] = value


def test_hostile_values_at_any_depth_never_cause_a_5xx(server, caplog):
    rng = random.Random(13)
    seen: dict[int, int] = {}
    with caplog.at_level(logging.INFO), httpx.Client(base_url=server.url, timeout=60) as client:
        for path, base in RICH:   # each rich body is valid as it stands
            assert client.post(path, json=base).status_code == 200
        for _ in range(150):
            path, body = copy.deepcopy(rng.choice(RICH))
            for _ in range(rng.randint(1, 3)):
                _put(body, rng.choice(list(_paths(body))), copy.deepcopy(rng.choice(DEEP)))
            if rng.random() < 0.3:
                body["stream"] = True
                if rng.random() < 0.5:
                    body["stream_options"] = {"include_usage": True}
            r = client.post(path, json=body)
            seen[r.status_code] = seen.get(r.status_code, 0) + 1
            assert r.status_code < 500, (body, r.text)
            assert "internal_error" not in r.text and "Traceback" not in r.text, (body, r.text)
    assert seen.get(400, 0) > 0 and seen.get(200, 0) > 0, seen
    assert server.wait_idle() == (0, False)
    assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR], caplog.text


LIMITS = {  # protobuf field type -> values at and past what the engine accepts
    "uint32": (0, 1, 20, 21, 128, 2**31, 2**32 - 1), "int32": (-2**31, -1, 0, 1, 2**31 - 1),
    "int64": (-2**63, -1, 0, 2**63 - 1), "bool": (True, False),
    "string": ("", "x", "\x00", "(a|", "a" * 2000),
    "double": (float("nan"), float("inf"), -float("inf"), -1.0, 0.0, 1e-300, 0.5, 1.0, 2.0, 101.0, 1e308),
}
KINDS = {FieldDescriptor.TYPE_UINT32: "uint32", FieldDescriptor.TYPE_INT32: "int32",
         FieldDescriptor.TYPE_INT64: "int64", FieldDescriptor.TYPE_BOOL: "bool",
         FieldDescriptor.TYPE_STRING: "string", FieldDescriptor.TYPE_DOUBLE: "double"}


def _random_sampling_params(rng: random.Random) -> pb.SamplingParams:
    sp = pb.SamplingParams()
    for f in sp.DESCRIPTOR.fields:
        if rng.random() > 0.15:
            continue
        if f.message_type is not None and f.message_type.GetOptions().map_entry:   # logit_bias
            for _ in range(rng.randint(0, 3)):
                getattr(sp, f.name)[rng.choice(LIMITS["uint32"])] = rng.choice(LIMITS["double"])
        elif f.message_type is not None:   # structured_outputs: one kind, a hostile value
            kind = rng.choice(("json", "json_object", "regex", "choice", "grammar"))
            target = getattr(sp, f.name)
            if kind == "json_object":
                target.json_object = rng.random() < 0.5
            elif kind == "choice":
                target.choice.values.extend(rng.choice(LIMITS["string"]) for _ in range(rng.randint(0, 3)))
            else:
                valid = ('{"type": "integer"}', 'root ::= "a"')
                setattr(target, kind, rng.choice(LIMITS["string"] + valid))
        elif f.is_repeated:
            getattr(sp, f.name).extend(rng.choice(LIMITS[KINDS[f.type]]) for _ in range(rng.randint(0, 4)))
        else:
            setattr(sp, f.name, rng.choice(LIMITS[KINDS[f.type]]))
    if not sp.HasField("max_tokens") or rng.random() < 0.9:   # keep most runs short
        sp.max_tokens = 3
    return sp


def test_random_grpc_sampling_params_never_fail_inside(server, caplog):
    rng = random.Random(7)
    codes: dict[str, int] = {}
    with caplog.at_level(logging.INFO), grpc.insecure_channel(server.grpc_target) as channel:
        stub = pb_grpc.GenerationStub(channel)
        for _ in range(150):
            req = pb.GenerateRequest(sampling_params=_random_sampling_params(rng))
            if rng.random() < 0.5:
                req.text = rng.choice(("", "\x00", "hello"))
            else:
                req.token_ids.ids.extend(rng.choice(LIMITS["uint32"]) for _ in range(rng.randint(0, 4)))
            if rng.random() < 0.2:
                req.priority = rng.choice(LIMITS["int32"])
            try:
                for _ in stub.Generate(req, timeout=60):
                    pass
                code = "OK"
            except grpc.RpcError as e:
                code = e.code().name
                assert code == "INVALID_ARGUMENT", (code, e.details(), req)
            codes[code] = codes.get(code, 0) + 1
    assert codes.get("OK", 0) > 0 and codes.get("INVALID_ARGUMENT", 0) > 0, codes
    assert server.wait_idle() == (0, False)
    assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR], caplog.text
