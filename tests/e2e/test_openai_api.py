"""The OpenAI-compatible HTTP API through the official ``openai`` client, on loopback.

Token parity: the server returns the token ids it generated (``return_token_ids``), and they
must equal ``LLM.generate`` / ``LLM.chat`` for the same prompt and seed.
"""

import httpx
import pytest

from jserve.sampling_params import SamplingParams

openai = pytest.importorskip("openai")

PROMPTS = ["Hello, my name is", "The capital of France is", "def fib(n):"]
MESSAGES = [{"role": "user", "content": "Tell me a story about a cat."}]
TOKENS = {"return_token_ids": True}


def _model(oai):
    return oai.models.list().data[0].id


def test_models_health_version(served, oai):
    models = oai.models.list().data
    assert [m.id for m in models] == [served.server.serving.card.name]
    assert models[0].model_extra["max_model_len"] == 128
    assert httpx.get(f"{served.url}/health").status_code == 200
    assert httpx.get(f"{served.url}/version").json()["version"]


@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=0.8, top_p=0.9, seed=7),
                                      dict(temperature=1.0, top_k=20, min_p=0.05, seed=11,
                                           repetition_penalty=1.2)])
def test_completion_tokens_match_llm_generate(oai, llm_ref, sampling):
    extra = {k: v for k, v in sampling.items() if k in ("top_k", "min_p", "repetition_penalty")}
    std = {k: v for k, v in sampling.items() if k not in extra}
    ref = llm_ref.generate(PROMPTS, SamplingParams(max_tokens=10, ignore_eos=True, **sampling))
    for prompt, want in zip(PROMPTS, ref, strict=True):
        r = oai.completions.create(model=_model(oai), prompt=prompt, max_tokens=10,
                                   extra_body={"ignore_eos": True, **extra, **TOKENS}, **std)
        choice = r.choices[0]
        assert choice.model_extra["token_ids"] == want.outputs[0].token_ids
        assert choice.text == want.outputs[0].text
        assert choice.finish_reason == "length"
        assert r.usage.prompt_tokens == len(want.prompt_token_ids)
        assert r.usage.completion_tokens == 10 and r.usage.total_tokens == r.usage.prompt_tokens + 10
        assert r.usage.prompt_tokens_details is None      # no prefix cache: nothing cached


def test_chat_tokens_match_llm_chat(oai, llm_ref):
    want = llm_ref.chat(MESSAGES, SamplingParams(temperature=0.7, seed=3, max_tokens=12))[0]
    r = oai.chat.completions.create(model=_model(oai), messages=MESSAGES, temperature=0.7, seed=3,
                                    max_tokens=12, extra_body=TOKENS)
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == want.outputs[0].text
    assert choice.model_extra["token_ids"] == want.outputs[0].token_ids
    assert r.model_extra["prompt_token_ids"] == want.prompt_token_ids
    assert choice.finish_reason == want.outputs[0].finish_reason


def test_chat_default_max_tokens_fills_the_context(oai):
    r = oai.chat.completions.create(model=_model(oai), messages=MESSAGES, temperature=0.0,
                                    extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens + r.usage.completion_tokens == 128


def test_streamed_completion_equals_full(oai):
    kw = dict(model=_model(oai), prompt=PROMPTS[0], max_tokens=16, temperature=0.0,
              extra_body={"ignore_eos": True, **TOKENS})
    full = oai.completions.create(**kw).choices[0]
    text, ids, finish, usage = "", [], None, None
    for chunk in oai.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        if chunk.usage is not None:
            usage = chunk.usage
            assert chunk.choices == []
            continue
        (c,) = chunk.choices
        assert finish is None, "no chunk after the finishing one"
        text += c.text
        ids += c.model_extra["token_ids"]
        finish = c.finish_reason
    assert (text, ids, finish) == (full.text, full.model_extra["token_ids"], "length")
    assert usage.completion_tokens == 16


def test_streamed_chat_role_then_content(oai):
    kw = dict(model=_model(oai), messages=MESSAGES, max_tokens=10, temperature=0.0)
    full = oai.chat.completions.create(**kw).choices[0]
    chunks = list(oai.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert content == full.message.content
    assert finishes == [full.finish_reason]
    assert chunks[-1].usage.completion_tokens == 10 and chunks[-1].object == "chat.completion.chunk"


def test_n2_gives_two_seeded_choices(oai, llm_ref):
    sp = SamplingParams(n=2, temperature=1.0, seed=5, max_tokens=8, ignore_eos=True)
    want = llm_ref.generate(PROMPTS[1], sp)[0]
    kw = dict(model=_model(oai), prompt=PROMPTS[1], n=2, temperature=1.0, seed=5, max_tokens=8,
              extra_body={"ignore_eos": True, **TOKENS})
    r = oai.completions.create(**kw)
    got = {c.index: c.model_extra["token_ids"] for c in r.choices}
    assert got == {i: o.token_ids for i, o in enumerate(want.outputs)}
    assert got[0] != got[1]
    assert r.usage.completion_tokens == 16
    streamed = {0: [], 1: []}
    for chunk in oai.completions.create(stream=True, **kw):
        for c in chunk.choices:
            streamed[c.index] += c.model_extra["token_ids"]
    assert streamed == got


def test_batch_prompts_keep_order(oai, llm_ref):
    ref = llm_ref.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
    r = oai.completions.create(model=_model(oai), prompt=PROMPTS, max_tokens=6, temperature=0.0,
                               extra_body={"ignore_eos": True, **TOKENS})
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.model_extra["token_ids"] for c in r.choices] == [o.outputs[0].token_ids for o in ref]


def test_token_id_prompt_and_echo(oai, llm_ref):
    ids = llm_ref.get_tokenizer().encode(PROMPTS[2])
    want = llm_ref.generate([ids], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))[0]
    r = oai.completions.create(model=_model(oai), prompt=ids, max_tokens=5, temperature=0.0,
                               extra_body={"ignore_eos": True, **TOKENS})
    assert r.choices[0].model_extra["token_ids"] == want.outputs[0].token_ids
    e = oai.completions.create(model=_model(oai), prompt=PROMPTS[2], max_tokens=5, temperature=0.0,
                               echo=True, extra_body={"ignore_eos": True})
    assert e.choices[0].text == PROMPTS[2] + want.outputs[0].text


def test_stop_strings(oai):
    kw = dict(model=_model(oai), prompt=PROMPTS[0], max_tokens=30, temperature=0.0,
              extra_body={"ignore_eos": True})
    text = oai.completions.create(**kw).choices[0].text
    stop = text[8:11]
    assert len(stop) == 3, f"need a longer greedy text to pick a stop string from: {text!r}"
    cut = text[:text.index(stop)]
    for stream in (False, True):
        if stream:
            chunks = list(oai.completions.create(stop=[stop], stream=True, **kw))
            got = "".join(c.choices[0].text for c in chunks)
            finish = chunks[-1].choices[0]
        else:
            finish = oai.completions.create(stop=[stop], **kw).choices[0]
            got = finish.text
        assert got == cut
        assert finish.finish_reason == "stop" and finish.model_extra["stop_reason"] == stop


def test_completion_logprobs_match_llm(oai, llm_ref):
    want = llm_ref.generate(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=5, logprobs=2,
                                                       ignore_eos=True))[0].outputs[0]
    r = oai.completions.create(model=_model(oai), prompt=PROMPTS[0], max_tokens=5, temperature=0.0,
                               logprobs=2, extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    for tid, entry, got, top in zip(want.token_ids, want.logprobs, lp.token_logprobs, lp.top_logprobs,
                                    strict=True):
        assert got == pytest.approx(entry[tid].logprob, abs=1e-6)
        assert len(top) >= 2 and max(top.values()) == pytest.approx(got, abs=1e-6)   # greedy = top-1
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)


def test_chat_logprobs(oai, llm_ref):
    want = llm_ref.chat(MESSAGES, SamplingParams(temperature=0.0, max_tokens=4, logprobs=3))[0].outputs[0]
    r = oai.chat.completions.create(model=_model(oai), messages=MESSAGES, max_tokens=4, temperature=0.0,
                                    logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == len(want.token_ids)
    for tid, entry, item in zip(want.token_ids, want.logprobs, content, strict=True):
        assert item.logprob == pytest.approx(entry[tid].logprob, abs=1e-6)
        assert len(item.top_logprobs) == 3
        assert [t.logprob for t in item.top_logprobs] == sorted((t.logprob for t in item.top_logprobs),
                                                                 reverse=True)
        assert item.bytes == list(item.token.encode())


def test_tokenize_detokenize(served, llm_ref):
    tok = llm_ref.get_tokenizer()
    r = httpx.post(f"{served.url}/tokenize", json={"prompt": PROMPTS[0]}).json()
    assert r["tokens"] == tok.encode(PROMPTS[0]) and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == 128
    back = httpx.post(f"{served.url}/detokenize", json={"tokens": r["tokens"]}).json()
    assert back["prompt"] == tok.decode(r["tokens"])
    chat = httpx.post(f"{served.url}/tokenize", json={"messages": MESSAGES}).json()
    assert chat["tokens"][0] == tok.bos_token_id and chat["tokens"][1] != tok.bos_token_id


def _scrape(served):
    text = httpx.get(f"{served.url}/metrics").text
    vals = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            vals[name] = float(value)
    return vals


def test_metrics_count_prefix_cache_hits(served, oai):
    label = '{model_name="llama"}'
    prompt = list(range(10, 10 + 40))  # 2 full pages of 16 + a partial one
    before = _scrape(served)
    for _ in range(2):
        r = oai.completions.create(model=_model(oai), prompt=prompt, max_tokens=2, temperature=0.0)
        served.wait_idle()
    after = _scrape(served)
    hits = f"jserve:prefix_cache_hits_device_total{label}"
    assert after[hits] - before.get(hits, 0) == 32
    queries = f"jserve:prefix_cache_queries_total{label}"
    assert after[queries] - before.get(queries, 0) >= 80
    assert r.usage.prompt_tokens_details.cached_tokens == 32
    assert f"jserve:kv_pages_cached_evictable{label}" in after


def test_cache_salt_separates_prefix_cache(served, oai):
    prompt = list(range(100, 100 + 40))  # 2 full pages + a partial one
    kw = dict(model=_model(oai), prompt=prompt, max_tokens=2, temperature=0.0)
    first = oai.completions.create(**kw, extra_body={"cache_salt": "tenant-a"})
    assert not (first.usage.prompt_tokens_details and first.usage.prompt_tokens_details.cached_tokens)
    other = oai.completions.create(**kw, extra_body={"cache_salt": "tenant-b"})
    assert not (other.usage.prompt_tokens_details and other.usage.prompt_tokens_details.cached_tokens)
    same = oai.completions.create(**kw, extra_body={"cache_salt": "tenant-a"})
    assert same.usage.prompt_tokens_details.cached_tokens == 32
    assert same.choices[0].text == first.choices[0].text
    r = httpx.post(f"{served.url}/v1/completions", json={**kw, "cache_salt": ""})
    assert r.status_code == 400 and r.json()["error"]["param"] == "cache_salt"


def test_metrics_count_requests(served, oai):
    scrape = lambda: _scrape(served)  # noqa: E731

    before = scrape()
    oai.completions.create(model=_model(oai), prompt=PROMPTS[0], max_tokens=7, temperature=0.0,
                           extra_body={"ignore_eos": True})
    served.wait_idle()
    after = scrape()
    label = '{model_name="llama"}'
    gen = f"jserve:generation_tokens_total{label}"
    assert after[gen] - before.get(gen, 0) == 7
    hist = f"jserve:e2e_request_latency_seconds_count{label}"
    assert after[hist] - before.get(hist, 0) == 1
    for name in ("jserve:time_to_first_token_seconds_count", "jserve:inter_token_latency_seconds_count",
                 "jserve:step_duration_seconds_count"):
        assert after[name + label] > before.get(name + label, 0)
    assert after[f"jserve:kv_cache_pages_used{label}"] == 0
    assert after[f"jserve:kv_cache_pages_free{label}"] == 79
    assert after[f"jserve:num_requests_running{label}"] == 0
    assert 'jserve:request_success_total{finished_reason="length",model_name="llama"}' in after


def test_api_key_on_http_and_grpc(served):
    import grpc

    from server.proto import jserve_pb2, jserve_pb2_grpc
    from server.runtime import RunningServer, ServerConfig

    guarded = RunningServer(served.aengine, ServerConfig(port=0, grpc_port=0, api_key="s3cret"),
                            "llama")
    served.run(guarded.start())
    try:
        url = guarded.base_url
        body = {"prompt": "hi", "max_tokens": 2}
        r = httpx.post(f"{url}/v1/completions", json=body)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert httpx.post(f"{url}/v1/completions", json=body,
                          headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.post(f"{url}/v1/completions", json=body,
                          headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert httpx.get(f"{url}/health").status_code == 200     # probes need no key
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
        assert client.models.list().data[0].id == "llama"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0).models.list()
        with grpc.insecure_channel(guarded.grpc_target) as ch:
            stub = jserve_pb2_grpc.GenerationStub(ch)
            with pytest.raises(grpc.RpcError) as e:
                stub.ListModels(jserve_pb2.ListModelsRequest(), timeout=10)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            ok = stub.ListModels(jserve_pb2.ListModelsRequest(), timeout=10,
                                 metadata=(("authorization", "Bearer s3cret"),))
            assert ok.models[0].id == "llama"
    finally:
        served.run(guarded.stop_frontends())
