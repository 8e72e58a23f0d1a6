"""One request must not hold up the others: a huge prompt does not stall streams in flight, and
a request with many sequences does not starve a small one that arrives after it.

Both run on the shared server (max_num_seqs 8, max_model_len 128, 4 MiB bodies).
"""

from __future__ import annotations

import asyncio
import json
import time

import grpc
import httpx

from server.proto import jserve_pb2 as pb
from server.proto import jserve_pb2_grpc as pb_grpc

HUGE = "lorem ipsum dolor sit amet " * 144_000          # 3.9 MB of text


def test_huge_prompt_does_not_stall_a_stream_in_flight(served):
    body = {"prompt": [5, 6, 7, 8], "max_tokens": 120, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "n": 1}

    def grpc_huge() -> grpc.StatusCode:
        with grpc.insecure_channel(served.grpc_target) as ch:
            try:
                list(pb_grpc.GenerationStub(ch).Generate(pb.GenerateRequest(text=HUGE), timeout=60))
            except grpc.RpcError as e:
                return e.code()
        return grpc.StatusCode.OK

    async def main():
        async with httpx.AsyncClient(base_url=served.url, timeout=120) as client:
            arrivals: list[float] = []
            first = asyncio.Event()

            async def stream() -> None:
                async with client.stream("POST", "/v1/completions", json=body) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            arrivals.append(time.monotonic())
                            first.set()

            task = asyncio.create_task(stream())
            await first.wait()
            huge = await asyncio.gather(
                client.post("/v1/completions", json={"prompt": HUGE, "max_tokens": 2}),
                client.post("/v1/chat/completions",
                            json={"messages": [{"role": "user", "content": HUGE}], "max_tokens": 2}),
                client.post("/tokenize", json={"prompt": HUGE}),
                asyncio.to_thread(grpc_huge))
            huge_done = time.monotonic()
            await task
            return arrivals, huge, huge_done

    arrivals, huge, huge_done = asyncio.run(main())
    assert [r.status_code for r in huge[:3]] == [400, 400, 400]
    assert [r.json()["error"]["param"] for r in huge[:3]] == ["prompt", "messages", "prompt"]
    assert huge[3] == grpc.StatusCode.INVALID_ARGUMENT
    assert huge_done < arrivals[-1], "the stream ended before the huge prompts were answered"
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    assert max(gaps) < 1.0, f"a stream in flight stalled for {max(gaps):.2f} s"
    assert served.wait_idle() == (0, False)


def test_small_request_is_not_starved_by_a_huge_n_request(served):
    big = {"prompt": [5, 6, 7, 8], "n": 64, "temperature": 1.0, "seed": 1, "max_tokens": 24,
           "ignore_eos": True, "stream": True}
    small = {"prompt": [9, 10, 11], "max_tokens": 4, "temperature": 0.0}

    async def main():
        async with httpx.AsyncClient(base_url=served.url, timeout=120) as client:
            finished: set[int] = set()
            first = asyncio.Event()

            async def run_big() -> None:
                async with client.stream("POST", "/v1/completions", json=big) as r:
                    assert r.status_code == 200
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            for c in json.loads(line[6:])["choices"]:
                                first.set()
                                if c["finish_reason"]:
                                    finished.add(c["index"])

            task = asyncio.create_task(run_big())
            await first.wait()
            r = await client.post("/v1/completions", json=small)
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
            big_finished_before_small = len(finished)
            await task
            return big_finished_before_small, len(finished)

    before, total = asyncio.run(main())
    assert total == 64
    # Fair admission: the small request takes the first free row (8 rows: after at most two
    # waves of the big request). First come, first served would make it wait for 56.
    assert before <= 16, before
    assert served.wait_idle() == (0, False)
