"""Load and disconnects: 200 concurrent streams (bounded in count and time), client aborts."""

import asyncio
import json
import socket
import time

import httpx
import pytest

NUM_STREAMS = 200
DISTINCT = 20
PARAMS = {"max_tokens": 8, "temperature": 0.0, "ignore_eos": True, "return_token_ids": True}


def _prompt(i: int) -> list[int]:
    return [10 + (i * 7 + j * 13) % 400 for j in range(3 + i % 9)]


def test_200_concurrent_streams_match_non_streamed(served):
    async def main():
        limits = httpx.Limits(max_connections=NUM_STREAMS, max_keepalive_connections=NUM_STREAMS)
        async with httpx.AsyncClient(base_url=served.url, timeout=120, limits=limits) as client:
            refs = []
            for i in range(DISTINCT):
                r = await client.post("/v1/completions", json={"prompt": _prompt(i), **PARAMS})
                assert r.status_code == 200, r.text
                c = r.json()["choices"][0]
                refs.append((c["token_ids"], c["text"]))

            async def stream(k: int):
                ids, text, finish, usage = [], "", None, None
                body = {"prompt": _prompt(k % DISTINCT), "stream": True,
                        "stream_options": {"include_usage": True}, **PARAMS}
                async with client.stream("POST", "/v1/completions", json=body) as r:
                    assert r.status_code == 200
                    async for line in r.aiter_lines():
                        if not line.startswith("data: "):
                            continue
                        if line == "data: [DONE]":
                            break
                        chunk = json.loads(line[6:])
                        assert "error" not in chunk, chunk
                        if chunk.get("usage"):
                            usage = chunk["usage"]
                        for c in chunk["choices"]:
                            ids += c["token_ids"]
                            text += c["text"]
                            finish = c["finish_reason"] or finish
                return k, ids, text, finish, usage

            t0 = time.monotonic()
            results = await asyncio.wait_for(asyncio.gather(*[stream(k) for k in range(NUM_STREAMS)]), 150)
            return refs, results, time.monotonic() - t0

    refs, results, seconds = asyncio.run(main())
    assert len(results) == NUM_STREAMS
    for k, ids, text, finish, usage in results:
        assert (ids, text) == refs[k % DISTINCT], f"stream {k} differs from the non-streamed result"
        assert finish == "length" and usage["completion_tokens"] == 8
    assert seconds < 150
    assert served.wait_idle() == (0, False)
    served.run(served.aengine.call(lambda e: e.pool.check_invariants()))


def _aborted(served) -> float:
    """Sequences finished with reason "abort" so far (from /metrics)."""
    key = 'jserve:request_success_total{finished_reason="abort",model_name="llama"} '
    for line in httpx.get(f"{served.url}/metrics").text.splitlines():
        if line.startswith(key):
            return float(line[len(key):])
    return 0.0


def test_disconnect_mid_stream_frees_pages(served):
    aborted = _aborted(served)
    body = {"prompt": [5, 6, 7, 8], "max_tokens": 110, "temperature": 0.0, "ignore_eos": True,
            "stream": True}
    with httpx.Client(base_url=served.url, timeout=60) as client:
        with client.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert json.loads(first[6:])["choices"]
            assert served.engine_state()[0] > 0           # the request holds pages now
        # leaving the block closed the connection mid-stream
    assert served.wait_idle() == (0, False)
    assert _aborted(served) == aborted + 1                # aborted, not run to the end


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": [5, 6, 7], "max_tokens": 110, "ignore_eos": True}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "ignore_eos": True}),
])
def test_disconnect_before_non_streamed_response_frees_pages(served, path, body):
    aborted = _aborted(served)
    host, port = served.url.removeprefix("http://").split(":")
    payload = json.dumps({**body, "temperature": 0.0}).encode()
    request = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(payload)}\r\n\r\n").encode() + payload
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        deadline = time.monotonic() + 10
        while served.engine_state()[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert served.engine_state()[0] > 0, "the request never started"
    assert served.wait_idle() == (0, False)
    assert _aborted(served) == aborted + 1
