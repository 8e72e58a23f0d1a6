"""What real clients send keeps working: the official openai client, LangChain's ChatOpenAI,
LiteLLM, and the benchmark clients of vLLM and SGLang (their request bodies, field for field),
plus the OpenAI fields that carry no generation semantics and ``/v1/models/{id}``.

The bodies below are what those clients put on the wire for a plain request (recorded from
their request builders: vLLM ``benchmarks/lib/endpoint_request_func.py``, SGLang
``bench_serving.py``, langchain-openai ``ChatOpenAI._default_params``, LiteLLM's
OpenAI-compatible provider); the libraries themselves are not dependencies.
"""

from __future__ import annotations

import json

import httpx
import pytest
from e2e_server import MODEL

PROMPT = "Once upon a time"
MESSAGES = [{"role": "user", "content": "Tell me a story."}]

BODIES = {
    "vllm-bench-completions": ("/v1/completions", {
        "model": MODEL, "prompt": PROMPT, "repetition_penalty": 1.0, "max_tokens": 6, "logprobs": None,
        "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}),
    "vllm-bench-chat": ("/v1/chat/completions", {
        "model": MODEL, "messages": [{"role": "user", "content": [{"type": "text", "text": PROMPT}]}],
        "max_completion_tokens": 6, "stream": True, "stream_options": {"include_usage": True},
        "ignore_eos": True}),
    "sglang-bench-completions": ("/v1/completions", {
        "model": MODEL, "prompt": PROMPT, "temperature": 0.0, "best_of": 1, "max_tokens": 6,
        "stream": True, "ignore_eos": True}),
    "sglang-bench-chat": ("/v1/chat/completions", {
        "model": MODEL, "messages": MESSAGES, "temperature": 0.0, "max_tokens": 6, "stream": False}),
    "langchain-chatopenai": ("/v1/chat/completions", {
        "messages": MESSAGES, "model": MODEL, "stream": False, "n": 1, "temperature": 0.7,
        "max_completion_tokens": 6}),
    "langchain-chatopenai-stream": ("/v1/chat/completions", {
        "messages": MESSAGES, "model": MODEL, "stream": True, "n": 1, "temperature": 0.7,
        "stream_options": {"include_usage": True}, "max_completion_tokens": 6}),
    "litellm-openai-compatible": ("/v1/chat/completions", {
        "model": MODEL, "messages": MESSAGES, "max_tokens": 6, "temperature": 0.2, "user": "u-1",
        "stream": False}),
    "openai-no-semantics-fields": ("/v1/chat/completions", {
        "model": MODEL, "messages": MESSAGES, "max_completion_tokens": 6, "user": "u-1",
        "metadata": {"team": "a"}, "store": False, "service_tier": "auto", "parallel_tool_calls": True,
        "response_format": {"type": "text"}, "logit_bias": {}, "tool_choice": "none", "priority": 3}),
}


def _completion_tokens(r: httpx.Response, stream: bool) -> int:
    if not stream:
        return r.json()["usage"]["completion_tokens"]
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    assert r.text.rstrip().endswith("data: [DONE]") and not any("error" in e for e in events), r.text
    usage = [e["usage"] for e in events if e.get("usage")]
    if usage:
        return usage[-1]["completion_tokens"]
    return sum(1 for e in events for c in e["choices"] if c.get("text") or c.get("delta", {}).get("content"))


@pytest.mark.parametrize("name", sorted(BODIES))
def test_client_body_is_served(served, name):
    path, body = BODIES[name]
    r = httpx.post(f"{served.url}{path}", json=body, timeout=60)
    assert r.status_code == 200, r.text
    n = _completion_tokens(r, body.get("stream", False))
    assert 1 <= n <= 6


def test_openai_client_with_no_semantics_fields(oai):
    chat = oai.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_completion_tokens=5, temperature=0.8, n=2, seed=3,
        user="someone", metadata={"k": "v"}, store=False, service_tier="auto", parallel_tool_calls=False,
        stop=["\n\n"], extra_body={"top_k": 20, "priority": -1})
    assert len(chat.choices) == 2 and chat.usage.completion_tokens <= 10
    stream = oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0.0, user="x",
                                    stream=True, stream_options={"include_usage": True})
    usage = [c.usage for c in stream if c.usage is not None]
    assert usage and usage[-1].completion_tokens <= 5


def test_openai_client_unsupported_field_is_refused_by_name(oai):
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=3,
                                    extra_body={"continue_final_message": True})
    assert e.value.body["param"] == "continue_final_message"
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3,
                               extra_body={"guided_decoding_backend": "xgrammar"})
    assert e.value.body["param"] == "guided_decoding_backend"


def test_retrieve_model(oai, served):
    model = oai.models.retrieve(MODEL)
    assert model.id == MODEL and model.owned_by == "jserve"
    r = httpx.get(f"{served.url}/v1/models/not-a-model", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
