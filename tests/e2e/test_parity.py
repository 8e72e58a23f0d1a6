"""vLLM parity details over HTTP with the official ``openai`` client (and raw SSE via httpx):
prompt_logprobs, echo with logprobs, truncate_prompt_tokens, ``max_tokens: null`` on
completions, continue_final_message and chat_template_kwargs, and stream chunks without null
fields. Token parity against ``LLM`` (the package's shared server and reference engine)."""

import json

import httpx
import pytest

from jserve.sampling_params import SamplingParams

openai = pytest.importorskip("openai")

PROMPT = "def fib(n):"
MESSAGES = [{"role": "user", "content": "Write a function."},
            {"role": "assistant", "content": "def add(a, b):"}]
TOKENS = {"return_token_ids": True, "ignore_eos": True}


def _model(oai):
    return oai.models.list().data[0].id


def test_prompt_logprobs_on_completions_and_chat(oai, llm_ref):
    want = llm_ref.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=2))[0]
    r = oai.completions.create(model=_model(oai), prompt=PROMPT, max_tokens=2, temperature=0.0,
                               extra_body={"prompt_logprobs": 2})
    got = r.choices[0].model_extra["prompt_logprobs"]
    assert len(got) == len(want.prompt_token_ids) and got[0] is None
    for tid, entry, g in zip(want.prompt_token_ids[1:], want.prompt_logprobs[1:], got[1:], strict=True):
        assert g[str(tid)]["logprob"] == pytest.approx(entry[tid].logprob, abs=1e-5)
        assert g[str(tid)]["rank"] == entry[tid].rank
        assert {lp["rank"] for t, lp in g.items() if t != str(tid)} <= {1, 2}
    c = oai.chat.completions.create(model=_model(oai), messages=MESSAGES[:1], max_tokens=2,
                                    extra_body={"prompt_logprobs": 0, **TOKENS})
    plp = c.model_extra["prompt_logprobs"]
    ids = c.model_extra["prompt_token_ids"]
    assert plp[0] is None and [list(e) for e in plp[1:]] == [[str(t)] for t in ids[1:]]
    with pytest.raises(openai.BadRequestError, match="prompt_logprobs"):
        oai.completions.create(model=_model(oai), prompt=PROMPT, max_tokens=2, stream=True,
                               extra_body={"prompt_logprobs": 1})


def test_echo_with_logprobs(oai, llm_ref):
    want = llm_ref.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=3, logprobs=1,
                                                   prompt_logprobs=1, ignore_eos=True))[0]
    kw = dict(model=_model(oai), prompt=PROMPT, max_tokens=3, temperature=0.0, logprobs=1, echo=True,
              extra_body={"ignore_eos": True})
    lp = oai.completions.create(**kw).choices[0].logprobs
    n_prompt = len(want.prompt_token_ids)
    assert len(lp.tokens) == len(lp.token_logprobs) == n_prompt + 3
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for i in range(1, n_prompt):
        tid = want.prompt_token_ids[i]
        assert lp.token_logprobs[i] == pytest.approx(want.prompt_logprobs[i][tid].logprob, abs=1e-5)
    comp = want.outputs[0]
    for k, tid in enumerate(comp.token_ids):
        assert lp.token_logprobs[n_prompt + k] == pytest.approx(comp.logprobs[k][tid].logprob, abs=1e-5)
    assert lp.text_offset == sorted(lp.text_offset)
    streamed = list(oai.completions.create(stream=True, **kw))
    joined = [t for c in streamed if c.choices and c.choices[0].logprobs
              for t in c.choices[0].logprobs.token_logprobs]
    assert joined == lp.token_logprobs
    assert "".join(c.choices[0].text for c in streamed if c.choices).startswith(PROMPT)


def test_truncate_prompt_tokens(oai, llm_ref):
    ids = llm_ref.get_tokenizer().encode("import numpy as np\nimport jax\n")
    want = llm_ref.generate([ids[-4:]], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))[0]
    r = oai.completions.create(model=_model(oai), prompt=ids, max_tokens=3, temperature=0.0,
                               extra_body={"truncate_prompt_tokens": 4, **TOKENS})
    assert r.usage.prompt_tokens == 4 and r.model_extra["prompt_token_ids"] == [ids[-4:]]
    assert r.choices[0].model_extra["token_ids"] == want.outputs[0].token_ids
    long = "x = 1\n" * 400                           # far over the 128-token context
    r = oai.completions.create(model=_model(oai), prompt=long, max_tokens=1,
                               extra_body={"truncate_prompt_tokens": -1})
    assert r.usage.prompt_tokens == 127
    c = oai.chat.completions.create(model=_model(oai), messages=MESSAGES[:1], max_tokens=1,
                                    extra_body={"truncate_prompt_tokens": 3})
    assert c.usage.prompt_tokens == 3
    with pytest.raises(openai.BadRequestError, match="truncate_prompt_tokens"):
        oai.completions.create(model=_model(oai), prompt=PROMPT, extra_body={"truncate_prompt_tokens": 0})


def test_completions_max_tokens_null_is_the_rest_of_the_context(served):
    body = {"prompt": PROMPT, "max_tokens": None, "temperature": 0.0, "ignore_eos": True}
    r = httpx.post(f"{served.url}/v1/completions", json=body, timeout=120).json()
    assert r["usage"]["prompt_tokens"] + r["usage"]["completion_tokens"] == 128
    assert r["choices"][0]["finish_reason"] == "length"
    absent = httpx.post(f"{served.url}/v1/completions", json={"prompt": PROMPT, "ignore_eos": True},
                        timeout=60).json()
    assert absent["usage"]["completion_tokens"] == 16          # OpenAI's default


def test_continue_final_message_and_template_kwargs(oai, llm_ref):
    sp = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    want = llm_ref.chat(MESSAGES, sp, add_generation_prompt=False, continue_final_message=True)[0]
    c = oai.chat.completions.create(model=_model(oai), messages=MESSAGES, max_tokens=4, temperature=0.0,
                                    extra_body={"continue_final_message": True,
                                                "add_generation_prompt": False, **TOKENS})
    assert c.model_extra["prompt_token_ids"] == want.prompt_token_ids
    assert c.choices[0].model_extra["token_ids"] == want.outputs[0].token_ids
    # add_generation_prompt defaults to false with continue_final_message, as in vLLM
    d = oai.chat.completions.create(model=_model(oai), messages=MESSAGES, max_tokens=1,
                                    extra_body={"continue_final_message": True, **TOKENS})
    assert d.model_extra["prompt_token_ids"] == want.prompt_token_ids
    with pytest.raises(openai.BadRequestError, match="continue_final_message"):
        oai.chat.completions.create(model=_model(oai), messages=MESSAGES[:1], max_tokens=1,
                                    extra_body={"continue_final_message": True})
    # chat_template_kwargs are template variables (this template prints bos_token first)
    plain = oai.chat.completions.create(model=_model(oai), messages=MESSAGES[:1], max_tokens=1,
                                        extra_body=TOKENS).model_extra["prompt_token_ids"]
    kw = oai.chat.completions.create(model=_model(oai), messages=MESSAGES[:1], max_tokens=1,
                                     extra_body={"chat_template_kwargs": {"bos_token": "Hello "}, **TOKENS})
    tok = llm_ref.get_tokenizer()
    assert tok.decode(kw.model_extra["prompt_token_ids"], skip_special_tokens=False).startswith("Hello ")
    assert kw.model_extra["prompt_token_ids"] != plain


def _sse(url: str, body: dict) -> list[dict]:
    chunks = []
    with httpx.stream("POST", url, json=body, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    return chunks


def _nulls(value, path=""):
    if value is None:
        yield path
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _nulls(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _nulls(v, f"{path}[{i}]")


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": PROMPT}),
    ("/v1/chat/completions", {"messages": MESSAGES[:1]}),
])
def test_stream_chunks_leave_out_null_fields(served, path, body):
    chunks = _sse(f"{served.url}{path}", {**body, "max_tokens": 4, "stream": True,
                                          "stream_options": {"include_usage": True}})
    assert len(chunks) >= 3
    allowed = {".choices[0].finish_reason", ".choices[0].logprobs"}   # vLLM and OpenAI send these
    for chunk in chunks:
        assert set(_nulls(chunk)) <= allowed, chunk
    assert "usage" not in chunks[0] and chunks[-1]["usage"]["completion_tokens"] == 4
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"


def test_readme_grpc_client_streams_a_completion(served, capsys, monkeypatch):
    """examples/grpc_client.py (the README's gRPC snippet) against the running server."""
    import runpy
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "examples" / "grpc_client.py"
    monkeypatch.setattr(sys, "argv", [str(script), served.grpc_target])
    runpy.run_path(str(script), run_name="__main__")
    assert len(capsys.readouterr().out.strip()) > 0
