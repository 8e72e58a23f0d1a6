"""``jserve serve`` as a real process: start-up banner, serving, and SIGTERM draining."""

import asyncio
import json
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import httpx
import pytest
from e2e_server import ENGINE_ARGS, ServerThread
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jserve.async_engine import AsyncEngine
from jserve.engine_api import EngineHealth
from server.proto import jserve_pb2 as pb
from server.proto import jserve_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[2]


class ServeProcess:
    """``python -m server serve`` on free ports; the ports are read from the start-up banner."""

    def __init__(self, cache_dir: str, *extra: str) -> None:
        args = [sys.executable, "-m", "server", "serve", "--port", "0", "--grpc-port", "0",
                "--compilation-cache-dir", cache_dir, *extra]
        for key in ("model", "dtype", "max_model_len", "max_num_seqs", "max_num_batched_tokens", "num_pages"):
            args += [f"--{key.replace('_', '-')}", str(ENGINE_ARGS[key])]
        self.proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self.log: list[str] = []
        self._ready = threading.Event()
        self.url = self.grpc_target = None
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(300) or self.url is None:
            self.kill()
            raise RuntimeError("jserve serve did not start:\n" + "".join(self.log[-40:]))

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.log.append(line)
            if m := re.search(r"HTTP  (http://127\.0\.0\.1:\d+)/v1", line):
                self.url = m.group(1)
            if m := re.search(r"gRPC  (127\.0\.0\.1:\d+)", line):
                self.grpc_target = m.group(1)
                self._ready.set()
        self._ready.set()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture(scope="module")
def proc(xla_cache_dir):
    p = ServeProcess(xla_cache_dir, "--shutdown-timeout", "60")
    yield p
    p.kill()


def test_banner_names_model_pool_and_compile_time(proc):
    text = "".join(proc.log)
    assert "jserve " in text and "KV pool: 80 pages x 16 tokens" in text
    assert re.search(r"start-up \(load \+ compile\): [\d.]+ s", text)
    assert re.search(r"compiled \d+ step variants", text)
    assert re.search(r"compiled step \d+/\d+ \(tokens \d+", text)  # one progress line per variant


async def _stream(client: httpx.AsyncClient, body: dict, started: threading.Event) -> tuple[int, str | None]:
    ids, finish = [], None
    async with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                c = json.loads(line[6:])["choices"][0]
                ids += c["token_ids"]
                finish = c["finish_reason"] or finish
                started.set()
    return len(ids), finish


STREAM = {"prompt": [5, 6, 7, 8], "max_tokens": 100, "temperature": 0.0, "ignore_eos": True,
          "stream": True, "return_token_ids": True}


def test_sigterm_drains_in_flight_and_exits(proc):
    """The signal path of a real process: every in-flight stream finishes, then a clean exit.
    (What the server answers *during* the drain is checked deterministically in-process below:
    here the drain may well be over before any probe could reach the process.)"""
    started = threading.Event()

    async def main():
        async with httpx.AsyncClient(base_url=proc.url, timeout=120,
                                     limits=httpx.Limits(max_connections=32)) as client:
            tasks = [asyncio.create_task(_stream(client, STREAM, started)) for _ in range(16)]
            while not started.is_set():
                await asyncio.sleep(0.005)
            proc.proc.send_signal(signal.SIGTERM)
            return await asyncio.gather(*tasks)

    results = asyncio.run(main())
    assert results == [(100, "length")] * 16          # drained: every in-flight stream finished
    assert proc.proc.wait(60) == 0, "".join(proc.log[-30:])
    text = "".join(proc.log)
    assert "SIGTERM received: draining" in text and "server stopped" in text
    assert "Traceback" not in text and " ERROR " not in text


def test_drain_refuses_new_requests_while_in_flight_ones_finish(make_engine):
    """Deterministic: the engine thread is held between steps while the server drains, so the
    in-flight requests cannot finish before every probe has been answered."""
    srv = ServerThread(AsyncEngine(make_engine("llama", **{k: v for k, v in ENGINE_ARGS.items()
                                                              if k != "model"})))
    started, gate = threading.Event(), threading.Event()

    async def main():
        async with httpx.AsyncClient(base_url=srv.url, timeout=120) as client:
            tasks = [asyncio.create_task(_stream(client, STREAM, started)) for _ in range(4)]
            while not started.is_set():
                await asyncio.sleep(0.005)
            asyncio.run_coroutine_threadsafe(srv.aengine.call(lambda _: gate.wait(60)), srv.loop)
            drained = asyncio.run_coroutine_threadsafe(srv.server.shutdown(60), srv.loop)
            while srv.aengine.health() is EngineHealth.SERVING:
                await asyncio.sleep(0.005)
            refused = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
            health = await client.get("/health")
            with grpc.insecure_channel(srv.grpc_target) as ch:
                status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
                gen = pb_grpc.GenerationStub(ch).Generate(pb.GenerateRequest(text="hi"), timeout=10)
                with pytest.raises(grpc.RpcError) as e:
                    list(gen)
            assert not drained.done()                    # still draining: the probes came first
            gate.set()
            results = await asyncio.gather(*tasks)
            await asyncio.wrap_future(drained)
            return results, refused, health, status, e.value.code()

    try:
        results, refused, health, status, code = asyncio.run(main())
    finally:
        gate.set()
        srv.close()
    assert refused.status_code == 503 and refused.json()["error"]["type"] == "service_unavailable"
    assert health.status_code == 503
    assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert code == grpc.StatusCode.UNAVAILABLE
    assert results == [(100, "length")] * 4
