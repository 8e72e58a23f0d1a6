"""Bad input: every case gets its documented status and error body, and the server keeps serving.

This module has its own engine: a small waiting queue (max_waiting=4) so "too many requests"
can be provoked, and a small body limit (64 KiB) for "too large".
"""

import asyncio

import grpc
import httpx
import pytest
from e2e_server import ENGINE_ARGS, ServerThread

from jserve.async_engine import AsyncEngine
from server.proto import jserve_pb2 as pb
from server.proto import jserve_pb2_grpc as pb_grpc

BODY_LIMIT = 64 * 1024
GOOD = {"prompt": "hello", "max_tokens": 3, "temperature": 0.0}
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


@pytest.fixture(scope="module")
def server(make_engine):
    engine = make_engine("llama", max_waiting=4, **{k: v for k, v in ENGINE_ARGS.items() if k != "model"})
    srv = ServerThread(AsyncEngine(engine), max_body_bytes=BODY_LIMIT)
    yield srv
    srv.close()


def _still_serving(server):
    r = httpx.post(f"{server.url}/v1/completions", json=GOOD, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


CASES = [
    # (id, path, body (dict) or raw bytes, status, param)
    ("malformed-json", "/v1/completions", b'{"prompt": "hi",', 400, None),
    ("not-an-object", "/v1/completions", b'["hi"]', 400, None),
    ("not-utf8", "/v1/completions", b"\xff\xfe{", 400, None),
    ("missing-prompt", "/v1/completions", {"max_tokens": 3}, 400, "prompt"),
    ("prompt-wrong-type", "/v1/completions", {"prompt": 5}, 400, "prompt"),
    ("prompt-mixed-list", "/v1/completions", {"prompt": ["a", 1]}, 400, "prompt"),
    ("prompt-empty-list", "/v1/completions", {"prompt": []}, 400, "prompt"),
    ("prompt-empty-string", "/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("temperature-string", "/v1/completions", {**GOOD, "temperature": "hot"}, 400, "temperature"),
    ("max-tokens-string", "/v1/completions", {**GOOD, "max_tokens": "10"}, 400, "max_tokens"),
    ("max-tokens-zero", "/v1/completions", {**GOOD, "max_tokens": 0}, 400, None),
    ("stream-string", "/v1/completions", {**GOOD, "stream": "yes"}, 400, "stream"),
    ("stop-int", "/v1/completions", {**GOOD, "stop": 3}, 400, "stop"),
    ("n-bool", "/v1/completions", {**GOOD, "n": True}, 400, "n"),
    ("n-huge", "/v1/completions", {**GOOD, "n": 10**9}, 400, "n"),
    ("logprobs-too-many", "/v1/completions", {**GOOD, "logprobs": 99}, 400, "logprobs"),
    ("top-p-zero", "/v1/completions", {**GOOD, "top_p": 0.0}, 400, None),
    ("negative-temperature", "/v1/completions", {**GOOD, "temperature": -1}, 400, None),
    ("stop-token-out-of-vocab", "/v1/completions", {**GOOD, "stop_token_ids": [10**6]}, 400, None),
    ("token-out-of-vocab", "/v1/completions", {**GOOD, "prompt": [1, 2, 10**6]}, 400, None),
    ("prompt-over-context", "/v1/completions", {**GOOD, "prompt": [7] * 128}, 400, "prompt"),
    ("prompt-text-over-context", "/v1/completions", {**GOOD, "prompt": "word " * 400}, 400, "prompt"),
    (
        "max-tokens-over-context",
        "/v1/completions",
        {**GOOD, "prompt": [7] * 100, "max_tokens": 40},
        400,
        "max_tokens",
    ),
    (
        "stream-options-without-stream",
        "/v1/completions",
        {**GOOD, "stream_options": {"include_usage": True}},
        400,
        "stream_options",
    ),
    ("suffix", "/v1/completions", {**GOOD, "suffix": "x"}, 400, "suffix"),
    ("logit-bias", "/v1/completions", {**GOOD, "logit_bias": {"5": 10}}, 400, "logit_bias"),
    ("unknown-model", "/v1/completions", {**GOOD, "model": "gpt-17"}, 404, "model"),
    ("chat-no-messages", "/v1/chat/completions", {"max_tokens": 3}, 400, "messages"),
    ("chat-bad-message", "/v1/chat/completions", {"messages": [{"content": "hi"}]}, 400, "messages"),
    (
        "chat-bad-content",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": 5}]},
        400,
        "messages",
    ),
    ("chat-top-logprobs-alone", "/v1/chat/completions", {**CHAT, "top_logprobs": 2}, 400, "top_logprobs"),
    ("chat-tools", "/v1/chat/completions", {**CHAT, "tools": [{"type": "function"}]}, 400, "tool_choice"),
    (
        "chat-json-mode",
        "/v1/chat/completions",
        {**CHAT, "response_format": {"type": "json_object"}},
        400,
        "response_format",
    ),
    ("chat-over-context", "/v1/chat/completions", {**CHAT, "max_tokens": 500}, 400, "max_tokens"),
    ("chat-unknown-model", "/v1/chat/completions", {**CHAT, "model": "nope"}, 404, "model"),
    ("tokenize-no-prompt", "/tokenize", {}, 400, "prompt"),
    ("detokenize-bad-ids", "/detokenize", {"tokens": ["a"]}, 400, "tokens"),
    ("detokenize-out-of-vocab", "/detokenize", {"tokens": [10**6]}, 400, "tokens"),
    ("body-too-large", "/v1/completions", {"prompt": "x" * (BODY_LIMIT + 10)}, 413, None),
]


@pytest.mark.parametrize("path, body, status, param", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_request_table(server, path, body, status, param):
    kw = (
        {"content": body, "headers": {"content-type": "application/json"}}
        if isinstance(body, bytes)
        else {"json": body}
    )
    r = httpx.post(f"{server.url}{path}", timeout=60, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == status and err["message"] and err["type"]
    if param is not None:
        assert err["param"] == param, err
    _still_serving(server)


def test_oversized_chunked_body_is_413(server):
    def body():
        yield b'{"prompt": "'
        for _ in range(BODY_LIMIT // 1024 + 2):
            yield b"x" * 1024
        yield b'"}'

    r = httpx.post(f"{server.url}/v1/completions", content=body(), timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == 413
    _still_serving(server)


def test_unknown_route_and_method(server):
    r = httpx.get(f"{server.url}/v1/nothing-here", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = httpx.get(f"{server.url}/v1/completions", timeout=10)
    assert r.status_code == 405 and "error" in r.json()
    _still_serving(server)


def test_too_many_requests_is_429_and_the_rest_complete(server):
    long = {"prompt": [5, 6, 7, 8], "max_tokens": 100, "temperature": 0.0, "ignore_eos": True}

    async def main():
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=40)) as client:
            return await asyncio.gather(
                *[client.post(f"{server.url}/v1/completions", json=long) for _ in range(30)]
            )

    responses = asyncio.run(main())
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429}, statuses
    assert 429 in statuses and statuses.count(200) >= 4  # at least a full waiting queue got in
    for r in responses:
        if r.status_code == 429:
            assert r.json()["error"]["type"] == "rate_limit_error"
        else:
            assert r.json()["usage"]["completion_tokens"] == 100
    assert server.wait_idle() == (0, False)
    _still_serving(server)


def test_grpc_queue_full_and_oversized_message(server):
    with grpc.insecure_channel(server.grpc_target) as ch:
        stub = pb_grpc.GenerationStub(ch)
        sp = pb.SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)
        calls = [
            stub.Generate(
                pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 6, 7]), sampling_params=sp), timeout=120
            )
            for _ in range(30)
        ]
        codes = []
        for call in calls:
            try:
                msgs = list(call)
                assert sum(len(c.token_ids) for m in msgs for c in m.choices) == 100
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as e:
                codes.append(e.code())
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes and codes.count(grpc.StatusCode.OK) >= 4

        with pytest.raises(grpc.RpcError) as e:
            list(stub.Generate(pb.GenerateRequest(text="x" * (BODY_LIMIT + 10)), timeout=30))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        small = pb.GenerateRequest(text="hi", sampling_params=pb.SamplingParams(max_tokens=2))
        ok = list(stub.Generate(small, timeout=30))
        assert sum(len(c.token_ids) for m in ok for c in m.choices) == 2
    assert server.wait_idle() == (0, False)


def test_error_body_is_openai_shaped(server):
    r = httpx.post(f"{server.url}/v1/completions", json={**GOOD, "model": "gpt-17"}, timeout=10)
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert (body["error"]["type"], body["error"]["code"], body["error"]["param"]) == (
        "not_found_error",
        404,
        "model",
    )
