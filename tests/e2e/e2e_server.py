"""ServerThread: a real RunningServer (HTTP + gRPC on 127.0.0.1, free ports) on its own loop thread.

Tests use blocking clients (openai, grpc) and asyncio clients (httpx) against it alike;
``streamed_completion`` reads a streamed completion through the ``openai`` client, and
``assert_same_greedy_completions`` compares two servers' greedy completions, streamed too.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from jserve.async_engine import AsyncEngine
from server.metrics import PrometheusStats
from server.runtime import RunningServer, ServerConfig

MODEL = str(Path(__file__).resolve().parents[1] / "fixtures" / "golden" / "llama")
ENGINE_ARGS = dict(model=MODEL, dtype="float32", max_model_len=128, max_num_seqs=8,
                   max_num_batched_tokens=64, num_pages=80)


class ServerThread:
    """A RunningServer (HTTP + gRPC) on its own event-loop thread."""

    def __init__(self, aengine: AsyncEngine, stats: PrometheusStats | None = None, **config: Any) -> None:
        config.setdefault("host", "127.0.0.1")
        config.setdefault("port", 0)
        config.setdefault("grpc_port", 0)
        self.aengine = aengine
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="e2e-server", daemon=True)
        self._thread.start()
        self.server = RunningServer(aengine, ServerConfig(**config), MODEL, stats)
        self.run(self.server.start())
        self.url = self.server.base_url
        self.grpc_target = self.server.grpc_target

    def run(self, coro: Coroutine, timeout: float = 60.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def engine_state(self) -> tuple[int, bool]:
        """(KV pages used, has unfinished requests), read on the engine thread."""
        return self.run(self.aengine.call(lambda e: (e.stats().kv_pages_used, e.has_unfinished_requests())))

    def wait_idle(self, timeout: float = 10.0) -> tuple[int, bool]:
        """Poll until no page is used and nothing is unfinished (aborts land asynchronously)."""
        deadline = time.monotonic() + timeout
        state = self.engine_state()
        while state != (0, False) and time.monotonic() < deadline:
            time.sleep(0.02)
            state = self.engine_state()
        return state

    def close(self, drain_engine: bool = True) -> None:
        coro = self.server.shutdown(5.0) if drain_engine else self.server.stop_frontends()
        try:
            self.run(coro)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()


def streamed_completion(client, **kw) -> tuple[str, list[int], str | None, object]:
    """A streamed ``/v1/completions`` call through the ``openai`` client -> (text, token ids
    (``return_token_ids``), finish reason, usage); asserts nothing follows the finishing chunk."""
    model = client.models.list().data[0].id
    text, ids, finish, usage = "", [], None, None
    for chunk in client.completions.create(model=model, stream=True,
                                           stream_options={"include_usage": True}, **kw):
        if chunk.usage is not None:
            usage = chunk.usage
            continue
        (c,) = chunk.choices
        assert finish is None, "no chunk after the finishing one"
        text += c.text
        ids += c.model_extra.get("token_ids") or []
        finish = c.finish_reason
    return text, ids, finish, usage


def assert_same_greedy_completions(ref_client, client, prompts: list[str], max_tokens: int,
                                   extra_body: dict) -> Any:
    """Greedy completions of ``prompts`` from two servers: equal token ids, text and usage,
    and ``client``'s streamed completion of the first prompt equals ``ref_client``'s
    non-streamed one -> the reference response."""
    kw = dict(prompt=prompts, max_tokens=max_tokens, temperature=0.0, extra_body=extra_body)
    ref = ref_client.completions.create(model=ref_client.models.list().data[0].id, **kw)
    got = client.completions.create(model=client.models.list().data[0].id, **kw)
    assert [c.model_extra["token_ids"] for c in got.choices] == \
        [c.model_extra["token_ids"] for c in ref.choices]
    assert [c.text for c in got.choices] == [c.text for c in ref.choices]
    assert got.usage.completion_tokens == ref.usage.completion_tokens == len(prompts) * max_tokens
    one = dict(kw, prompt=prompts[0])
    text, ids, finish, usage = streamed_completion(client, **one)
    assert (text, ids, finish) == (ref.choices[0].text, ref.choices[0].model_extra["token_ids"],
                                   "length")
    assert usage.completion_tokens == max_tokens
    return ref
