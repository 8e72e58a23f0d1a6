"""Bad input: every case gets its documented status and error body, and the server keeps serving.

One table of cases, each with an HTTP form, a gRPC form, or both; after every case the test
checks that the server still serves a normal request over the same front door. The module has
its own engine: a small waiting queue (max_waiting=4) so "too many requests" and "can never
fit" can be provoked, a small body limit (64 KiB) for "too large", and short header / body
timeouts (1 s) and a connection cap for the stalled-upload cases.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import pytest
from e2e_server import ENGINE_ARGS, ServerThread

from jserve.async_engine import AsyncEngine
from server.json_body import MAX_JSON_DEPTH
from server.proto import jserve_pb2 as pb
from server.proto import jserve_pb2_grpc as pb_grpc
from server.protocol import MAX_STOP_CHARS, MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS

BODY_LIMIT = 64 * 1024
MAX_CONNECTIONS = 48
GOOD = {"prompt": "hello", "max_tokens": 3, "temperature": 0.0}
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
C, CC, TOK = "/v1/completions", "/v1/chat/completions", "/tokenize"
INVALID, NOT_FOUND, EXHAUSTED = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                                 grpc.StatusCode.RESOURCE_EXHAUSTED)


@pytest.fixture(scope="module")
def server(make_engine):
    engine = make_engine("llama", max_waiting=4, **{k: v for k, v in ENGINE_ARGS.items() if k != "model"})
    srv = ServerThread(AsyncEngine(engine), max_body_bytes=BODY_LIMIT, header_timeout_s=1.0,
                       body_timeout_s=1.0, max_connections=MAX_CONNECTIONS)
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.grpc_target) as ch:
        yield pb_grpc.GenerationStub(ch)


@pytest.fixture(scope="module")
def raw_generate(server):
    """Generate taking raw request bytes (to send what no stub would encode)."""
    with grpc.insecure_channel(server.grpc_target) as ch:
        yield ch.unary_stream("/jserve.v1.Generation/Generate", request_serializer=None,
                              response_deserializer=pb.GenerateResponse.FromString)


def _http_still_serving(server) -> None:
    r = httpx.post(f"{server.url}/v1/completions", json=GOOD, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def _grpc_still_serving(stub) -> None:
    req = pb.GenerateRequest(text="hi", priority=-1,
                             sampling_params=pb.SamplingParams(max_tokens=2, temperature=0.0))
    msgs = list(stub.Generate(req, timeout=60))
    assert sum(len(c.token_ids) for m in msgs for c in m.choices) == 2


def _nested(depth: int) -> bytes:
    return b"[" * depth + b"1" + b"]" * depth


def _sp(**kw: Any) -> pb.SamplingParams:
    return pb.SamplingParams(max_tokens=kw.pop("max_tokens", 3), **kw)


def _raw_text_request(text: bytes) -> bytes:
    """A GenerateRequest whose ``text`` (field 3) holds ``text`` verbatim, valid UTF-8 or not."""
    assert len(text) < 128
    return bytes([0x1A, len(text)]) + text


@dataclass(frozen=True)
class Case:
    """One bad input: ``http`` = (path, JSON body or raw bytes, status, param or None);
    ``grpc`` = (GenerateRequest or raw bytes, code)."""

    id: str
    http: tuple[str, Any, int, str | None] | None = None
    grpc: tuple[Any, grpc.StatusCode] | None = None


MANY_STOPS = [f"s{i}" for i in range(MAX_STOP_STRINGS + 1)]
LONG_STOP = ["y" * (MAX_STOP_CHARS + 1)]
MANY_IDS = [1] * (MAX_STOP_TOKEN_IDS + 1)

CASES = [
    # --- the body itself
    Case("malformed-json", http=(C, b'{"prompt": "hi",', 400, None)),
    Case("not-an-object", http=(C, b'["hi"]', 400, None)),
    Case("not-utf8", http=(C, b"\xff\xfe{", 400, None)),
    Case("nan-constant", http=(C, b'{"prompt": "hi", "temperature": NaN}', 400, None)),
    Case("nested-past-limit", http=(C, b'{"prompt": ' + _nested(MAX_JSON_DEPTH + 5) + b"}", 400,
                                    "prompt" + "[0]" * (MAX_JSON_DEPTH - 1))),
    Case("nested-20k", http=(C, b'{"prompt": ' + _nested(20_000) + b"}", 400, None)),
    Case("body-too-large", http=(C, {"prompt": "x" * (BODY_LIMIT + 10)}, 413, None),
         grpc=(pb.GenerateRequest(text="x" * (BODY_LIMIT + 10)), EXHAUSTED)),
    Case("grpc-garbage-bytes", grpc=(b"\xff\xff\xff\xff\x0f\x01", INVALID)),
    Case("grpc-invalid-utf8-text", grpc=(_raw_text_request(b"abc\xed\xa0\x80def"), INVALID)),
    Case("grpc-unknown-field", grpc=(_raw_text_request(b"hi") + b"\xf8\x01\x01", INVALID)),
    Case("grpc-unknown-sampling-field", grpc=(_raw_text_request(b"hi") + b"\x2a\x03\xf8\x01\x01", INVALID)),
    # --- lone surrogates: 400 naming the field, never a 500
    Case("surrogate-prompt", http=(C, b'{"prompt": "abc\\ud800def", "max_tokens": 3}', 400, "prompt")),
    Case("surrogate-chat-content", http=(CC, b'{"messages": [{"role": "user", "content": "x\\udfff"}]}',
                                         400, "messages[0].content")),
    Case("surrogate-raw-bytes-chat",
         http=(CC, b'{"messages": [{"role": "user", "content": "x\xed\xa0\x80"}]}', 400,
               "messages[0].content")),
    Case("surrogate-tokenize", http=(TOK, b'{"prompt": "\\ud800"}', 400, "prompt")),
    Case("surrogate-stop", http=(C, b'{"prompt": "hi", "stop": ["a", "\\udc00"]}', 400, "stop[1]")),
    # --- prompts
    Case("missing-prompt", http=(C, {"max_tokens": 3}, 400, "prompt"),
         grpc=(pb.GenerateRequest(sampling_params=_sp()), INVALID)),
    Case("prompt-wrong-type", http=(C, {"prompt": 5}, 400, "prompt")),
    Case("prompt-mixed-list", http=(C, {"prompt": ["a", 1]}, 400, "prompt")),
    Case("prompt-empty-list", http=(C, {"prompt": []}, 400, "prompt"),
         grpc=(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[])), INVALID)),
    Case("prompt-empty-string", http=(C, {"prompt": ""}, 400, "prompt")),
    Case("token-out-of-vocab", http=(C, {**GOOD, "prompt": [1, 2, 10**6]}, 400, None),
         grpc=(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 10**6])), INVALID)),
    Case("prompt-over-context", http=(C, {**GOOD, "prompt": [7] * 128}, 400, "prompt"),
         grpc=(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[7] * 128)), INVALID)),
    Case("prompt-text-over-context", http=(C, {**GOOD, "prompt": "word " * 400}, 400, "prompt"),
         grpc=(pb.GenerateRequest(text="word " * 400), INVALID)),
    Case("prompt-text-over-char-cap", http=(C, {**GOOD, "prompt": "x" * 60_000}, 400, "prompt"),
         grpc=(pb.GenerateRequest(text="x" * 60_000), INVALID)),
    Case("tokenize-over-char-cap", http=(TOK, {"prompt": "x" * 60_000}, 400, "prompt")),
    # --- sampling fields: the param is the field the client sent
    Case("temperature-string", http=(C, {**GOOD, "temperature": "hot"}, 400, "temperature")),
    Case("negative-temperature", http=(C, {**GOOD, "temperature": -1}, 400, "temperature"),
         grpc=(pb.GenerateRequest(text="hi", sampling_params=_sp(temperature=-1)), INVALID)),
    Case("top-p-zero", http=(C, {**GOOD, "top_p": 0.0}, 400, "top_p")),
    Case("repetition-penalty-zero", http=(C, {**GOOD, "repetition_penalty": 0}, 400, "repetition_penalty")),
    Case("min-tokens-over-max", http=(C, {**GOOD, "min_tokens": 9}, 400, "min_tokens")),
    Case("max-tokens-string", http=(C, {**GOOD, "max_tokens": "10"}, 400, "max_tokens")),
    Case("max-tokens-zero", http=(C, {**GOOD, "max_tokens": 0}, 400, "max_tokens"),
         grpc=(pb.GenerateRequest(text="hi", sampling_params=_sp(max_tokens=0)), INVALID)),
    Case("max-tokens-5000-digits", http=(C, b'{"prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}", 400,
                                         "max_tokens")),
    Case("max-completion-tokens-negative", http=(CC, {**CHAT, "max_completion_tokens": -3}, 400,
                                                 "max_completion_tokens")),
    Case("max-completion-tokens-over-context", http=(CC, {**CHAT, "max_completion_tokens": 500}, 400,
                                                     "max_completion_tokens")),
    Case("max-tokens-over-context",
         http=(C, {**GOOD, "prompt": [7] * 100, "max_tokens": 40}, 400, "max_tokens"),
         grpc=(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[7] * 100), sampling_params=_sp(max_tokens=40)),
               INVALID)),
    Case("chat-over-context", http=(CC, {**CHAT, "max_tokens": 500}, 400, "max_tokens")),
    Case("stream-string", http=(C, {**GOOD, "stream": "yes"}, 400, "stream")),
    Case("stop-int", http=(C, {**GOOD, "stop": 3}, 400, "stop")),
    Case("stop-too-many", http=(C, {**GOOD, "stop": MANY_STOPS}, 400, "stop"),
         grpc=(pb.GenerateRequest(text="hi", sampling_params=_sp(stop=MANY_STOPS)), INVALID)),
    Case("stop-too-long", http=(C, {**GOOD, "stop": LONG_STOP}, 400, "stop"),
         grpc=(pb.GenerateRequest(text="hi", sampling_params=_sp(stop=LONG_STOP)), INVALID)),
    Case("stop-token-ids-too-many", http=(C, {**GOOD, "stop_token_ids": MANY_IDS}, 400, "stop_token_ids"),
         grpc=(pb.GenerateRequest(text="hi", sampling_params=_sp(stop_token_ids=MANY_IDS)), INVALID)),
    Case("stop-token-out-of-vocab", http=(C, {**GOOD, "stop_token_ids": [10**6]}, 400, "stop_token_ids")),
    Case("n-bool", http=(C, {**GOOD, "n": True}, 400, "n")),
    Case("n-huge", http=(C, {**GOOD, "n": 10**9}, 400, "n")),
    Case("n-greedy", http=(C, {**GOOD, "n": 2}, 400, "n"),
         grpc=(pb.GenerateRequest(text="hi", sampling_params=_sp(n=2, temperature=0.0)), INVALID)),
    Case("n-can-never-fit", http=(C, {**GOOD, "n": 5, "temperature": 1.0}, 400, "n"),
         grpc=(pb.GenerateRequest(text="hi", sampling_params=_sp(n=5, temperature=1.0)), INVALID)),
    Case("prompts-x-n-can-never-fit",
         http=(C, {**GOOD, "prompt": ["a"] * 7, "n": 2, "temperature": 1.0}, 400, "n")),
    Case("logprobs-too-many", http=(C, {**GOOD, "logprobs": 99}, 400, "logprobs"),
         grpc=(pb.GenerateRequest(text="hi", sampling_params=_sp(logprobs=99)), INVALID)),
    Case("priority-string", http=(C, {**GOOD, "priority": "high"}, 400, "priority")),
    Case("priority-out-of-range", http=(C, {**GOOD, "priority": 2**40}, 400, "priority")),
    Case("stream-options-without-stream", http=(C, {**GOOD, "stream_options": {"include_usage": True}}, 400,
                                                "stream_options")),
    Case("stream-options-unknown-key", http=(C, {**GOOD, "stream": True, "stream_options": {"x": 1}}, 400,
                                             "stream_options.x")),
    # --- fields jserve does not implement: refused by name, never ignored
    Case("unknown-field", http=(C, {**GOOD, "temprature": 0.5}, 400, "temprature")),
    Case("unknown-chat-field", http=(CC, {**CHAT, "modalities": ["audio"]}, 400, "modalities")),
    Case("suffix", http=(C, {**GOOD, "suffix": "x"}, 400, "suffix")),
    # --- token masks: honoured, so a malformed value is a 400 naming the field
    Case("logit-bias-bad-key", http=(C, {**GOOD, "logit_bias": {"x": 10}}, 400, "logit_bias")),
    Case("logit-bias-out-of-range", http=(C, {**GOOD, "logit_bias": {"5": 500}}, 400, "logit_bias")),
    Case("guided-json-bad-schema", http=(C, {**GOOD, "guided_json": {"type": "strin"}}, 400, "guided_json")),
    Case("guided-choice-empty-string", http=(CC, {**CHAT, "guided_choice": ["a", ""]}, 400, "guided_choice")),
    Case("structured-outputs-unknown-key", http=(C, {**GOOD, "structured_outputs": {"regx": "a+"}}, 400,
                                                 "structured_outputs")),
    Case("structured-outputs-bad-regex", http=(C, {**GOOD, "structured_outputs": {"regex": "a("}}, 400,
                                               "structured_outputs")),
    Case("response-format-bad-type", http=(C, {**GOOD, "response_format": {"type": "xml"}}, 400,
                                           "response_format.type")),
    Case("two-constraints", http=(CC, {**CHAT, "response_format": {"type": "json_object"},
                                       "guided_regex": "a"}, 400, "guided_regex")),
    Case("guided-decoding-backend", http=(C, {**GOOD, "guided_decoding_backend": "xgrammar"}, 400,
                                          "guided_decoding_backend")),
    Case("bad-words-not-strings", http=(C, {**GOOD, "bad_words": [1]}, 400, "bad_words")),
    Case("allowed-token-ids-out-of-vocab", http=(C, {**GOOD, "allowed_token_ids": [10**6]}, 400,
                                                 "allowed_token_ids")),
    Case("truncate-prompt-tokens-zero",
         http=(C, {**GOOD, "truncate_prompt_tokens": 0}, 400, "truncate_prompt_tokens")),
    Case("prompt-logprobs-too-many", http=(C, {**GOOD, "prompt_logprobs": 21}, 400, "prompt_logprobs")),
    Case("continue-final-message-after-user", http=(CC, {**CHAT, "continue_final_message": True}, 400,
                                                    "continue_final_message")),
    Case("beam-search", http=(C, {**GOOD, "use_beam_search": True}, 400, "use_beam_search")),
    Case("chat-tools-malformed", http=(CC, {**CHAT, "tools": [{"type": "function"}]}, 400,
                                       "tools[0].function")),
    Case("chat-tool-choice-auto-without-parser", http=(CC, {**CHAT, "tool_choice": "auto", "tools": [
        {"type": "function", "function": {"name": "f"}}]}, 400, "tool_choice")),
    Case("chat-tool-choice-required", http=(CC, {**CHAT, "tool_choice": "required"}, 400, "tool_choice")),
    Case("chat-functions", http=(CC, {**CHAT, "functions": [{"name": "f"}]}, 400, "functions")),
    # --- chat messages
    Case("chat-no-messages", http=(CC, {"max_tokens": 3}, 400, "messages")),
    Case("chat-no-role", http=(CC, {"messages": [{"content": "hi"}]}, 400, "messages[0].role")),
    Case("chat-unknown-role", http=(CC, {"messages": [{"role": "wizard", "content": "hi"}]}, 400,
                                    "messages[0].role")),
    Case("chat-bad-content", http=(CC, {"messages": [{"role": "user", "content": 5}]}, 400, "messages")),
    Case("chat-top-logprobs-alone", http=(CC, {**CHAT, "top_logprobs": 2}, 400, "top_logprobs")),
    Case("chat-over-char-cap", http=(CC, {"messages": [{"role": "user", "content": "x" * 60_000}]}, 400,
                                     "messages")),
    # --- models, tokenize, detokenize
    Case("unknown-model", http=(C, {**GOOD, "model": "gpt-17"}, 404, "model"),
         grpc=(pb.GenerateRequest(text="hi", model="gpt-17"), NOT_FOUND)),
    Case("chat-unknown-model", http=(CC, {**CHAT, "model": "nope"}, 404, "model")),
    Case("tokenize-no-prompt", http=(TOK, {}, 400, "prompt")),
    Case("tokenize-unknown-field", http=(TOK, {"prompt": "hi", "n": 2}, 400, "n")),
    Case("detokenize-bad-ids", http=("/detokenize", {"tokens": ["a"]}, 400, "tokens")),
    Case("detokenize-out-of-vocab", http=("/detokenize", {"tokens": [10**6]}, 400, "tokens")),
]

HTTP_CASES = [c for c in CASES if c.http is not None]
GRPC_CASES = [c for c in CASES if c.grpc is not None]


@pytest.mark.parametrize("case", HTTP_CASES, ids=[c.id for c in HTTP_CASES])
def test_bad_input_over_http(server, case, caplog):
    path, body, status, param = case.http
    kw = ({"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes)
          else {"json": body})
    with caplog.at_level(logging.INFO):
        r = httpx.post(f"{server.url}{path}", timeout=60, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == status and err["message"] and err["type"]
    assert "Traceback" not in err["message"] and "Exceeds the limit" not in err["message"]
    if param is not None:
        assert err["param"] == param, err
    assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR], caplog.text
    _http_still_serving(server)


@pytest.mark.parametrize("case", GRPC_CASES, ids=[c.id for c in GRPC_CASES])
def test_bad_input_over_grpc(server, stub, raw_generate, case, caplog):
    request, code = case.grpc
    with caplog.at_level(logging.INFO), pytest.raises(grpc.RpcError) as e:
        call = raw_generate if isinstance(request, bytes) else stub.Generate
        list(call(request, timeout=60))
    assert e.value.code() == code, e.value.details()
    assert e.value.details() and "Unexpected" not in e.value.details()
    assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR], caplog.text
    _grpc_still_serving(stub)
    _http_still_serving(server)


def test_oversized_chunked_body_is_413(server):
    def body():
        yield b'{"prompt": "'
        for _ in range(BODY_LIMIT // 1024 + 2):
            yield b"x" * 1024
        yield b'"}'

    r = httpx.post(f"{server.url}/v1/completions", content=body(), timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == 413
    _http_still_serving(server)


def test_unknown_route_and_method(server):
    r = httpx.get(f"{server.url}/v1/nothing-here", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = httpx.get(f"{server.url}/v1/completions", timeout=10)
    assert r.status_code == 405 and "error" in r.json()
    _http_still_serving(server)


def test_too_many_requests_is_429_with_retry_after_and_the_rest_complete(server):
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
            assert int(r.headers["retry-after"]) >= 1
        else:
            assert r.json()["usage"]["completion_tokens"] == 100
    assert server.wait_idle() == (0, False)
    _http_still_serving(server)


def test_grpc_queue_full_carries_retry_after(server, stub):
    sp = pb.SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)
    calls = [stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 6, 7]), sampling_params=sp),
                           timeout=120) for _ in range(30)]
    codes, retry = [], set()
    for call in calls:
        try:
            msgs = list(call)
            assert sum(len(c.token_ids) for m in msgs for c in m.choices) == 100
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as e:
            codes.append(e.code())
            retry |= {v for k, v in e.trailing_metadata() or () if k == "retry-after"}
    assert set(codes) <= {grpc.StatusCode.OK, EXHAUSTED}
    assert EXHAUSTED in codes and codes.count(grpc.StatusCode.OK) >= 4
    assert retry == {"1"}
    assert server.wait_idle() == (0, False)
    _grpc_still_serving(stub)


def test_error_body_is_openai_shaped(server):
    r = httpx.post(f"{server.url}/v1/completions", json={**GOOD, "model": "gpt-17"}, timeout=10)
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert (body["error"]["type"], body["error"]["code"], body["error"]["param"]) == (
        "not_found_error",
        404,
        "model",
    )


# ------------------------------------------------------------------ stalled and vanishing clients
def _connect(server) -> socket.socket:
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=30)


def _read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_stalled_headers_and_body_are_cut_off_quietly(server, caplog):
    partial_headers = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Le"
    body = json.dumps(GOOD).encode()
    partial_body = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n" % len(body)) + body[:5]
    with caplog.at_level(logging.DEBUG):
        silent, stalled_head, stalled_body = _connect(server), _connect(server), _connect(server)
        stalled_head.sendall(partial_headers)
        stalled_body.sendall(partial_body)
        assert _read_until_closed(silent) == b""          # closed by the header timeout
        assert _read_until_closed(stalled_head) == b""
        reply = _read_until_closed(stalled_body)           # the body timeout answers 408
        assert reply.startswith(b"HTTP/1.1 408") and b'"code":408' in reply
        for s in (silent, stalled_head, stalled_body):
            s.close()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    _http_still_serving(server)


def test_client_gone_mid_upload_is_not_an_error(server, caplog):
    body = json.dumps(GOOD).encode()
    with caplog.at_level(logging.DEBUG):
        s = _connect(server)
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
                  + body[:4])
        time.sleep(0.2)      # the app is waiting for the rest of the body
        s.close()
        _http_still_serving(server)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def test_connection_cap_refuses_then_recovers(server):
    socks = [_connect(server) for _ in range(MAX_CONNECTIONS)]
    try:
        for s in socks:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")   # keep-alive: each stays open
            assert s.recv(65536).startswith(b"HTTP/1.1 200")
        r = httpx.get(f"{server.url}/health", timeout=10)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "service_unavailable"
    finally:
        for s in socks:
            s.close()
    deadline = time.monotonic() + 10
    while httpx.get(f"{server.url}/health", timeout=10).status_code != 200:
        assert time.monotonic() < deadline, "the connection cap never freed up"
        time.sleep(0.05)
    _http_still_serving(server)
