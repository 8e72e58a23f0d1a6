"""``jserve bench``: an async, bounded load client for a running jserve (or any OpenAI) server.

Where it sits: outside the server; it only talks HTTP (OpenAI completions, streamed) or gRPC
(jserve.v1.Generation). One run sends ``num_prompts`` requests with at most ``concurrency`` in
flight (and, if ``request_rate`` is finite, Poisson arrivals at that rate); a sweep repeats the
run for each concurrency. Per run it reports request/s, output tok/s and TTFT / TPOT / ITL / E2E
(mean, p50, p95, p99), prints a table and can write everything as JSON. Against a server with
speculative decoding it also reports each run's acceptance rate and mean accepted length, read
from the server's ``/metrics`` (server/bench_spec.py).

Prompts: ``random`` makes token-id prompts of exactly ``input_len`` tokens (so a model without a
tokenizer, e.g. ``--random-weights``, works), sent with ``ignore_eos`` so every request generates
exactly ``output_len`` tokens; or a JSONL file with "prompt" (text) or "prompt_token_ids" per
line (and an optional "output_len"). Tokens are counted from the streamed token ids
(``return_token_ids``); against a server without that extension each text chunk counts as one.

The published loop shape this must reproduce: 16 requests, 128 in / 64 out, concurrency 1,2,4::

    jserve bench --num-prompts 16 --input-len 128 --output-len 64 --concurrency 1,2,4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from server.bench_spec import format_spec, read_spec_counters, spec_summary

BenchPrompt = tuple[str | list[int], int]        # (prompt, max output tokens)


@dataclass(frozen=True)
class BenchConfig:
    backend: str = "openai"                       # "openai" (HTTP completions) | "grpc"
    base_url: str = "http://127.0.0.1:8000"
    grpc_target: str = "127.0.0.1:50051"
    model: str | None = None                      # None: the server's first model
    num_prompts: int = 16
    input_len: int = 128
    output_len: int = 64
    concurrency: tuple[int, ...] = (1,)           # 0 = unbounded
    request_rate: float = math.inf                # requests/s (Poisson); inf = all at once
    dataset: str | None = None                    # JSONL path; None = random token ids
    vocab_size: int | None = None                 # random prompts: None = ask the server
    temperature: float = 0.0
    ignore_eos: bool = True
    seed: int = 0
    warmup: int = 1
    api_key: str | None = None
    timeout_s: float = 600.0
    result_json: str | None = None
    metrics_url: str | None = None                # None: <base_url>/metrics; "" = not read

    def __post_init__(self) -> None:
        if self.backend not in ("openai", "grpc"):
            raise ValueError(f"backend must be 'openai' or 'grpc', got {self.backend!r}")
        for name in ("num_prompts", "input_len", "output_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.concurrency or any(c < 0 for c in self.concurrency):
            raise ValueError(f"concurrency must be a list of integers >= 0, got {self.concurrency}")
        if not self.request_rate > 0:
            raise ValueError(f"request_rate must be > 0 (inf = no pacing), got {self.request_rate}")
        if self.warmup < 0 or self.timeout_s <= 0:
            raise ValueError("warmup must be >= 0 and timeout_s > 0")


@dataclass
class RequestResult:
    ok: bool
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0              # seconds
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""

    @property
    def tpot(self) -> float | None:
        return (self.e2e - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


# ------------------------------------------------------------------------------ prompts
def random_prompts(n: int, input_len: int, output_len: int, vocab_size: int, seed: int) -> list[BenchPrompt]:
    """Token-id prompts of exactly ``input_len`` ids, drawn away from the low (special) ids."""
    low = min(10, vocab_size - 1)
    rng = np.random.default_rng(seed)
    return [(rng.integers(low, vocab_size, size=input_len).tolist(), output_len) for _ in range(n)]


def dataset_prompts(path: str, n: int, output_len: int) -> list[BenchPrompt]:
    rows = []
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: invalid JSON: {e}") from e
        prompt = d.get("prompt_token_ids", d.get("prompt")) if isinstance(d, dict) else None
        if not (isinstance(prompt, str) and prompt) and not (isinstance(prompt, list) and prompt):
            raise ValueError(f"{path}:{lineno}: needs a non-empty 'prompt' or 'prompt_token_ids'")
        rows.append((prompt, int(d.get("output_len", output_len))))
    if not rows:
        raise ValueError(f"{path}: no prompts")
    return [rows[i % len(rows)] for i in range(n)]


# ------------------------------------------------------------------------------ backends
class HTTPBackend:
    """Streamed OpenAI completions over httpx."""

    def __init__(self, cfg: BenchConfig) -> None:
        import httpx

        self.cfg = cfg
        headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
        conc = max(cfg.concurrency) or cfg.num_prompts
        self.client = httpx.AsyncClient(base_url=cfg.base_url, headers=headers,
                                        timeout=httpx.Timeout(cfg.timeout_s),
                                        limits=httpx.Limits(max_connections=conc + 4,
                                                            max_keepalive_connections=conc + 4))

    async def model_info(self) -> tuple[str, int | None]:
        r = await self.client.get("/v1/models")
        r.raise_for_status()
        data = r.json()["data"]
        chosen = next((m for m in data if m["id"] == self.cfg.model), data[0])
        return self.cfg.model or chosen["id"], chosen.get("vocab_size")

    async def send(self, model: str, prompt: str | list[int], max_tokens: int) -> RequestResult:
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True,
                "temperature": self.cfg.temperature, "ignore_eos": self.cfg.ignore_eos,
                "stream_options": {"include_usage": True}, "return_token_ids": True}
        res = RequestResult(ok=False)
        t0 = last = time.perf_counter()
        async with self.client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:200]}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    res.error = obj["error"].get("message", str(obj["error"]))
                    return res
                now = time.perf_counter()
                ntok = sum(len(c["token_ids"]) if "token_ids" in c else int(bool(c.get("text")))
                           for c in obj.get("choices", []))
                if ntok:
                    if res.output_tokens == 0:
                        res.ttft = now - t0
                    else:
                        res.itl.append(now - last)
                    last = now
                    res.output_tokens += ntok
                if obj.get("usage"):
                    res.prompt_len = obj["usage"]["prompt_tokens"]
                    res.output_tokens = obj["usage"]["completion_tokens"]
        res.e2e = time.perf_counter() - t0
        res.ok = True
        return res

    async def close(self) -> None:
        await self.client.aclose()


class GRPCBackend:
    """jserve.v1.Generation/Generate over grpc.aio."""

    def __init__(self, cfg: BenchConfig) -> None:
        import grpc

        from server.proto import jserve_pb2, jserve_pb2_grpc

        self.cfg, self.pb, self.grpc = cfg, jserve_pb2, grpc
        self.channel = grpc.aio.insecure_channel(cfg.grpc_target)
        self.stub = jserve_pb2_grpc.GenerationStub(self.channel)
        self.metadata = (("authorization", f"Bearer {cfg.api_key}"),) if cfg.api_key else None

    async def model_info(self) -> tuple[str, int | None]:
        resp = await self.stub.ListModels(self.pb.ListModelsRequest(), metadata=self.metadata,
                                          timeout=self.cfg.timeout_s)
        chosen = next((m for m in resp.models if m.id == self.cfg.model), resp.models[0])
        return self.cfg.model or chosen.id, chosen.vocab_size or None

    async def send(self, model: str, prompt: str | list[int], max_tokens: int) -> RequestResult:
        pb = self.pb
        sp = pb.SamplingParams(max_tokens=max_tokens, temperature=self.cfg.temperature,
                               ignore_eos=self.cfg.ignore_eos)
        req = (pb.GenerateRequest(model=model, text=prompt, sampling_params=sp) if isinstance(prompt, str)
               else pb.GenerateRequest(model=model, token_ids=pb.TokenIds(ids=prompt), sampling_params=sp))
        res = RequestResult(ok=False)
        t0 = last = time.perf_counter()
        try:
            async for msg in self.stub.Generate(req, metadata=self.metadata, timeout=self.cfg.timeout_s):
                now = time.perf_counter()
                ntok = sum(len(c.token_ids) for c in msg.choices)
                if ntok:
                    if res.output_tokens == 0:
                        res.ttft = now - t0
                    else:
                        res.itl.append(now - last)
                    last = now
                    res.output_tokens += ntok
                if msg.HasField("usage"):
                    res.prompt_len = msg.usage.prompt_tokens
        except self.grpc.aio.AioRpcError as e:
            res.error = f"gRPC {e.code().name}: {e.details()}"
            return res
        res.e2e = time.perf_counter() - t0
        res.ok = True
        return res

    async def close(self) -> None:
        await self.channel.close()


# ------------------------------------------------------------------------------ runs
async def run_load(send: Callable[[BenchPrompt], Awaitable[RequestResult]], prompts: list[BenchPrompt],
                   concurrency: int, request_rate: float, seed: int) -> tuple[list[RequestResult], float]:
    """All prompts with at most ``concurrency`` in flight (0: unbounded); (results, seconds)."""
    sem = asyncio.Semaphore(concurrency) if concurrency else None
    rng = np.random.default_rng(seed)

    async def one(p: BenchPrompt) -> RequestResult:
        try:
            if sem is None:
                return await send(p)
            async with sem:
                return await send(p)
        except Exception as e:  # a transport error fails this request, not the run
            return RequestResult(ok=False, error=f"{type(e).__name__}: {e}")

    t0 = time.perf_counter()
    tasks = []
    for p in prompts:
        tasks.append(asyncio.create_task(one(p)))
        if math.isfinite(request_rate):
            await asyncio.sleep(float(rng.exponential(1.0 / request_rate)))
    results = list(await asyncio.gather(*tasks))
    return results, time.perf_counter() - t0


def _dist(values: list[float]) -> dict[str, float]:
    """mean / p50 / p95 / p99 in milliseconds (NaN when empty)."""
    if not values:
        return {k: math.nan for k in ("mean", "p50", "p95", "p99")}
    a = np.asarray(values) * 1e3
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)),
            "p95": float(np.percentile(a, 95)), "p99": float(np.percentile(a, 99))}


def summarize(results: list[RequestResult], duration: float, concurrency: int) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_len for r in ok)
    return {
        "concurrency": concurrency, "num_requests": len(results), "completed": len(ok),
        "failed": len(results) - len(ok), "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": duration, "input_tokens": in_tokens, "output_tokens": out_tokens,
        "request_throughput": len(ok) / duration, "output_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
        "ttft_ms": _dist([r.ttft for r in ok]),
        "tpot_ms": _dist([t for r in ok if (t := r.tpot) is not None]),
        "itl_ms": _dist([g for r in ok for g in r.itl]),
        "e2e_ms": _dist([r.e2e for r in ok]),
    }


def format_table(runs: list[dict[str, Any]]) -> str:
    head = (f"{'conc':>5} {'ok/n':>7} {'req/s':>7} {'out tok/s':>10} | {'TTFT mean':>9} {'p50':>7} "
            f"{'p95':>7} {'p99':>7} | {'TPOT mean':>9} {'p95':>7} | {'ITL mean':>8} {'p95':>7} {'p99':>7} | "
            f"{'E2E mean':>8} {'p50':>7} {'p95':>7} {'p99':>7}   (ms)")
    lines = [head, "-" * len(head)]
    for r in runs:
        t, p, i, e = r["ttft_ms"], r["tpot_ms"], r["itl_ms"], r["e2e_ms"]
        conc = r["concurrency"] or "inf"
        lines.append(
            f"{conc:>5} {r['completed']:>3}/{r['num_requests']:<3} {r['request_throughput']:>7.2f} "
            f"{r['output_throughput']:>10.1f} | {t['mean']:>9.1f} {t['p50']:>7.1f} {t['p95']:>7.1f} "
            f"{t['p99']:>7.1f} | {p['mean']:>9.2f} {p['p95']:>7.2f} | {i['mean']:>8.2f} {i['p95']:>7.2f} "
            f"{i['p99']:>7.2f} | {e['mean']:>8.1f} {e['p50']:>7.1f} {e['p95']:>7.1f} {e['p99']:>7.1f}")
        if r.get("spec_decode"):
            lines.append(format_spec(r["spec_decode"]))
        for err in r["errors"]:
            lines.append(f"      error: {err}")
    return "\n".join(lines)


async def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    """Warm up, then one run per concurrency; returns {"config", "model", "runs"}."""
    backend = HTTPBackend(cfg) if cfg.backend == "openai" else GRPCBackend(cfg)
    try:
        model, vocab = await backend.model_info()
        if cfg.dataset:
            prompts = dataset_prompts(cfg.dataset, cfg.num_prompts, cfg.output_len)
        else:
            vocab = cfg.vocab_size or vocab
            if not vocab:
                raise ValueError("vocab_size: the server does not report one; pass --vocab-size")
            prompts = random_prompts(cfg.num_prompts, cfg.input_len, cfg.output_len, vocab, cfg.seed)

        async def send(p: BenchPrompt) -> RequestResult:
            return await backend.send(model, p[0], p[1])

        for i in range(cfg.warmup):
            res = await send(prompts[i % len(prompts)])
            if not res.ok:
                raise RuntimeError(f"warm-up request failed: {res.error}")
        metrics = _metrics_reader(cfg)
        runs = []
        for conc in cfg.concurrency:
            before = await metrics()
            results, duration = await run_load(send, prompts, conc, cfg.request_rate, cfg.seed)
            runs.append(summarize(results, duration, conc))
            spec = spec_summary(before, await metrics())
            if spec is not None:
                runs[-1]["spec_decode"] = spec
        report = {"config": asdict(cfg), "model": model, "runs": runs}
        if cfg.result_json:
            path = Path(cfg.result_json)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
        return report
    finally:
        await backend.close()


def _metrics_reader(cfg: BenchConfig) -> Callable[[], Awaitable[dict[str, float] | None]]:
    """-> an async reader of the server's speculative-decoding counters (server/bench_spec.py)
    over HTTP, whichever backend loads the server; it returns None when there are none."""
    url = f"{cfg.base_url}/metrics" if cfg.metrics_url is None else cfg.metrics_url

    async def read() -> dict[str, float] | None:
        if not url:
            return None
        import httpx

        headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
        async with httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(30.0)) as client:
            return await read_spec_counters(client, url)

    return read


# ------------------------------------------------------------------------------ CLI
def _concurrency_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--concurrency: expected integers like 1,2,4, got {text!r}") from e
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"--concurrency: expected integers >= 0, got {text!r}")
    return values


def add_bench_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=["openai", "grpc"], default="openai",
                   help="protocol to load the server with (default: %(default)s)")
    p.add_argument("--base-url", default="http://127.0.0.1:8000",
                   help="HTTP server (openai backend) (default: %(default)s)")
    p.add_argument("--grpc-target", default="127.0.0.1:50051",
                   help="host:port (grpc backend) (default: %(default)s)")
    p.add_argument("--model", default=None, help="model name (default: the server's first)")
    p.add_argument("--num-prompts", type=int, default=16,
                   help="requests per concurrency level (default: %(default)s)")
    p.add_argument("--input-len", type=int, default=128,
                   help="prompt tokens of random prompts (default: %(default)s)")
    p.add_argument("--output-len", type=int, default=64,
                   help="tokens generated per request (default: %(default)s)")
    p.add_argument("--concurrency", type=_concurrency_list, default=(1,),
                   help="max requests in flight; a comma list sweeps (e.g. 1,2,4); 0 = unbounded "
                   "(default: 1)")
    p.add_argument("--request-rate", type=float, default=math.inf,
                   help="requests/s (Poisson); inf = all at once (default: %(default)s)")
    p.add_argument("--dataset", default=None,
                   help="JSONL with 'prompt' or 'prompt_token_ids' per line (default: random prompts)")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="random prompts: token id range (default: the server's vocabulary)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature (default: %(default)s)")
    p.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="let requests stop at EOS (default: ignore EOS, every request makes "
                   "--output-len tokens)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=1,
                   help="requests sent (and not counted) first (default: %(default)s)")
    p.add_argument("--api-key", default=None, help="the server's API key (default: none)")
    p.add_argument("--timeout", dest="timeout_s", type=float, default=600.0,
                   help="seconds per request (default: %(default)s)")
    p.add_argument("--result-json", default=None,
                   help="write the config and every run here (default: not written)")
    p.add_argument("--metrics-url", default=None,
                   help="the server's Prometheus endpoint, read before and after each run for the "
                   "speculative decoding figures (default: <base-url>/metrics; '' = not read)")


def bench_config_from(ns: argparse.Namespace) -> BenchConfig:
    return BenchConfig(
        backend=ns.backend, base_url=ns.base_url.rstrip("/"), grpc_target=ns.grpc_target, model=ns.model,
        num_prompts=ns.num_prompts, input_len=ns.input_len, output_len=ns.output_len,
        concurrency=ns.concurrency, request_rate=ns.request_rate, dataset=ns.dataset,
        vocab_size=ns.vocab_size, temperature=ns.temperature, ignore_eos=ns.ignore_eos, seed=ns.seed,
        warmup=ns.warmup, api_key=ns.api_key, timeout_s=ns.timeout_s, result_json=ns.result_json,
        metrics_url=ns.metrics_url)


def cmd_bench(ns: argparse.Namespace) -> int:
    cfg = bench_config_from(ns)
    logging.getLogger("httpx").setLevel(logging.WARNING)     # not one INFO line per request
    import grpc
    import httpx

    try:
        report = asyncio.run(run_bench(cfg))
    except (httpx.TransportError, grpc.RpcError) as e:   # no server there: one line, no traceback
        target = cfg.base_url if cfg.backend == "openai" else cfg.grpc_target
        detail = e.details() if isinstance(e, grpc.RpcError) else str(e)
        raise ValueError(f"cannot reach the {cfg.backend} server at {target}: {detail}") from None
    print(f"jserve bench: {cfg.backend} {cfg.base_url if cfg.backend == 'openai' else cfg.grpc_target} "
          f"model={report['model']} {cfg.num_prompts} requests, "
          f"{'dataset ' + cfg.dataset if cfg.dataset else f'{cfg.input_len} in / {cfg.output_len} out'}")
    print(format_table(report["runs"]))
    if cfg.result_json:
        print(f"results written to {cfg.result_json}")
    return 0 if all(r["failed"] == 0 for r in report["runs"]) else 1
