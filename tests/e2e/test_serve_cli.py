"""``jserve serve`` as a real process: start-up banner, serving, and SIGTERM draining."""

import asyncio
import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import httpx
import pytest
from e2e_server import ENGINE_ARGS
from grpc_health.v1 import health_pb2, health_pb2_grpc

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


def test_sigterm_drains_in_flight_and_refuses_new(proc):
    body = {"prompt": [5, 6, 7, 8], "max_tokens": 100, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "return_token_ids": True}
    started = threading.Event()

    async def stream(client):
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

    async def main():
        async with httpx.AsyncClient(base_url=proc.url, timeout=120,
                                     limits=httpx.Limits(max_connections=32)) as client:
            tasks = [asyncio.create_task(stream(client)) for _ in range(16)]
            while not started.is_set():
                await asyncio.sleep(0.005)
            proc.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.05)
            refused = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
            health = await client.get("/health")
            with grpc.insecure_channel(proc.grpc_target) as ch:
                status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
            return await asyncio.gather(*tasks), refused, health, status

    results, refused, health, status = asyncio.run(main())
    assert refused.status_code == 503 and refused.json()["error"]["type"] == "service_unavailable"
    assert health.status_code == 503
    assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert results == [(100, "length")] * 16          # drained: every in-flight stream finished
    t0 = time.monotonic()
    assert proc.proc.wait(60) == 0, "".join(proc.log[-30:])
    assert time.monotonic() - t0 < 60
    text = "".join(proc.log)
    assert "SIGTERM received: draining" in text and "server stopped" in text
