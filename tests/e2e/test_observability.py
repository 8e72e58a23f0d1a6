"""What an operator sees of a running server: vLLM's request histograms and cache_config_info
on /metrics after real requests, and one access-log line per request (httpx and the openai
client against the package's shared server)."""

import logging

import httpx
import pytest

openai = pytest.importorskip("openai")
LABEL = '{model_name="llama"}'


def _scrape(served) -> dict[str, float]:
    vals = {}
    for line in httpx.get(f"{served.url}/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            vals[name] = float(value)
    return vals


def test_request_histograms_and_cache_config(served, oai):
    before = _scrape(served)
    r = oai.completions.create(model=oai.models.list().data[0].id, prompt="def fib(n):", max_tokens=6,
                               temperature=0.0, extra_body={"ignore_eos": True})
    served.wait_idle()
    after = _scrape(served)
    delta = lambda name: after[name + LABEL] - before.get(name + LABEL, 0)  # noqa: E731
    for stem in ("request_queue_time_seconds", "request_prefill_time_seconds",
                 "request_decode_time_seconds", "request_prompt_tokens", "request_generation_tokens"):
        assert delta(f"jserve:{stem}_count") == 1, stem
    assert delta("jserve:request_prompt_tokens_sum") == r.usage.prompt_tokens
    assert delta("jserve:request_generation_tokens_sum") == 6
    assert delta("jserve:time_per_output_token_seconds_count") == 5      # gaps between 6 tokens
    assert delta("jserve:iteration_tokens_total_count") >= 6              # prefill + decode steps
    assert delta("jserve:iteration_tokens_total_sum") >= r.usage.prompt_tokens + 5
    info = [k for k in after if k.startswith("jserve:cache_config_info{")]
    assert len(info) == 1 and after[info[0]] == 1
    assert 'block_size="16"' in info[0] and 'num_gpu_blocks="79"' in info[0]


def test_one_access_log_line_per_request(served, oai, caplog):
    caplog.set_level(logging.DEBUG, logger="jserve.access")
    model = oai.models.list().data[0].id
    r = oai.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                    max_tokens=3, extra_body={"ignore_eos": True})
    list(oai.completions.create(model=model, prompt="x = 1", max_tokens=2, stream=True,
                                extra_body={"ignore_eos": True}))
    httpx.post(f"{served.url}/v1/completions", json={"prompt": "x", "temprature": 1})
    httpx.get(f"{served.url}/health")
    served.wait_idle()
    lines = [rec for rec in caplog.records if rec.name == "jserve.access"]
    text = [rec.getMessage() for rec in lines]
    chat = [t for t in text if t.startswith("POST /v1/chat/completions 200 ")]
    assert len(chat) == 1 and f"tokens={r.usage.prompt_tokens}+3 " in chat[0] and chat[0].endswith(" ms")
    stream = [t for t in text if t.startswith("POST /v1/completions 200 ")]
    assert len(stream) == 1 and "+2 " in stream[0]
    assert any(t.startswith("POST /v1/completions 400 ") for t in text)
    assert [rec.levelno for rec in lines if rec.getMessage().startswith("GET /health")] == [logging.DEBUG]
    assert all(rec.levelno == logging.INFO for rec in lines if "/v1/" in rec.getMessage())


def test_engine_stats_line_while_busy(make_engine, caplog):
    """AsyncEngine logs vLLM's periodic engine line while it has work (a tiny interval here;
    10 s by default). The engine has the shared one's shape: its steps load from the cache."""
    import asyncio

    from e2e_server import ENGINE_ARGS

    from jserve.async_engine import AsyncEngine
    from jserve.sampling_params import SamplingParams

    caplog.set_level(logging.INFO, logger="jserve.metrics")
    engine = make_engine("llama", **{k: v for k, v in ENGINE_ARGS.items() if k != "model"})

    async def run() -> None:
        aengine = AsyncEngine(engine, log_stats_interval_s=1e-9)
        async for _ in aengine.generate([5, 6, 7], SamplingParams(max_tokens=8, ignore_eos=True)):
            pass
        await aengine.shutdown()

    asyncio.run(run())
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("engine: ")]
    assert lines and all("running" in ln and "waiting" in ln and "KV cache" in ln and "tok/s" in ln
                         for ln in lines)
