"""Running the servers: HTTP (uvicorn) and gRPC in one event loop over one AsyncEngine.

Where it sits: the top of ``jserve serve`` (server/cli.py) and of the e2e tests. Start-up and
shutdown order::

    start:    bind sockets -> uvicorn task + grpc.aio server -> health SERVING -> banner
    SIGTERM:  engine.begin_drain()          new requests: HTTP 503 / gRPC UNAVAILABLE,
              health NOT_SERVING            /health 503
              engine.shutdown(deadline)     in-flight requests finish; past the deadline the
                                            rest end with finish_reason "abort"
              gRPC stop, uvicorn exit       open streams have ended by now
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import uvicorn

from jserve.async_engine import AsyncEngine
from jserve.engine_api import EngineHealth
from server.grpc_service import GrpcServer, start_grpc_server
from server.http_app import DEFAULT_BODY_TIMEOUT_S, DEFAULT_MAX_BODY_BYTES, build_http_app
from server.http_limits import limited_protocol
from server.metrics import PrometheusStats
from server.serving import DEFAULT_TOKENIZER_THREADS, Serving

log = logging.getLogger("jserve.server")


@dataclass(frozen=True)
class ServerConfig:
    """Front-end options (``jserve serve`` flags)."""

    host: str = "127.0.0.1"
    port: int = 8000                    # 0: a free port
    grpc_port: int | None = 50051       # None: no gRPC server; 0: a free port
    api_key: str | None = None
    served_model_names: tuple[str, ...] = ()   # empty: the --model string
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    shutdown_timeout_s: float = 30.0
    enable_metrics: bool = True
    access_log: bool = False
    header_timeout_s: float = 10.0      # request line + headers must arrive within this
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S   # the whole body must arrive within this (408)
    max_connections: int = 1024         # open HTTP connections; past it: 503 and closed
    tokenizer_threads: int = DEFAULT_TOKENIZER_THREADS
    tool_call_parser: str | None = None  # server/tool_parsers/: hermes, llama3_json

    def __post_init__(self) -> None:
        for name in ("header_timeout_s", "body_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("max_connections", "tokenizer_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.grpc_port is not None and not 0 <= self.grpc_port <= 65535:
            raise ValueError(f"grpc_port must be in [0, 65535], got {self.grpc_port}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be >= 1024, got {self.max_body_bytes}")
        if self.shutdown_timeout_s < 0:
            raise ValueError(f"shutdown_timeout_s must be >= 0, got {self.shutdown_timeout_s}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must not be empty (omit it to disable authentication)")
        if not all(name.strip() for name in self.served_model_names):
            raise ValueError("served_model_names (--served-model-name) must be non-empty names, got "
                             f"{list(self.served_model_names)}")


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: RunningServer drains the engine first."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


class RunningServer:
    """HTTP + gRPC over ``engine`` in the running event loop. ``start()``, then ``shutdown()``."""

    def __init__(self, engine: AsyncEngine, config: ServerConfig, model: str,
                 stats: PrometheusStats | None = None) -> None:
        self.engine = engine
        self.config = config
        names = list(config.served_model_names) or [model]
        self.serving = Serving(engine, names, root=model, tokenizer_threads=config.tokenizer_threads,
                               tool_call_parser=config.tool_call_parser)
        self.stats = stats
        self.http_port: int | None = None
        self.grpc_port: int | None = None
        self._uvicorn: _Uvicorn | None = None
        self._http_task: asyncio.Task | None = None
        self._grpc: GrpcServer | None = None
        self._health_task: asyncio.Task | None = None
        self._stopped = asyncio.Event()

    @property
    def base_url(self) -> str:
        host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
        return f"http://{host}:{self.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"{self.config.host}:{self.grpc_port}"

    async def start(self) -> None:
        cfg = self.config
        app = build_http_app(self.serving, self.stats, cfg.api_key, cfg.max_body_bytes, cfg.body_timeout_s)
        sock = _bind(cfg.host, cfg.port)
        self.http_port = sock.getsockname()[1]
        ucfg = uvicorn.Config(app, log_level=logging.getLogger().getEffectiveLevel(), lifespan="off",
                              access_log=cfg.access_log, timeout_graceful_shutdown=5,
                              timeout_keep_alive=5,
                              http=limited_protocol(cfg.header_timeout_s, cfg.max_connections))
        self._uvicorn = _Uvicorn(ucfg)
        self._http_task = asyncio.create_task(self._uvicorn.serve(sockets=[sock]))
        while not self._uvicorn.started:
            if self._http_task.done():
                self._http_task.result()     # re-raises the start-up error
                raise RuntimeError("the HTTP server exited during start-up")
            await asyncio.sleep(0.01)
        if cfg.grpc_port is not None:
            self._grpc = await start_grpc_server(self.serving, cfg.host, cfg.grpc_port, cfg.api_key,
                                                 cfg.max_body_bytes)
            self.grpc_port = self._grpc.port
            self._health_task = asyncio.create_task(self._follow_engine_health())

    async def _follow_engine_health(self, interval_s: float = 0.25) -> None:
        """gRPC health follows the engine (as /health does): NOT_SERVING once it drains or its
        loop has ended, e.g. after a crash."""
        while self.engine.health() is EngineHealth.SERVING:
            await asyncio.sleep(interval_s)
        if self._grpc is not None:
            await self._grpc.set_serving(False)

    async def shutdown(self, timeout_s: float | None = None) -> None:
        """Drain the engine (refuse new requests, finish or abort in-flight), then stop both servers."""
        timeout = self.config.shutdown_timeout_s if timeout_s is None else timeout_s
        self.engine.begin_drain()
        if self._grpc is not None:
            await self._grpc.set_serving(False)
        log.info("draining: %d request(s) in flight, deadline %.1f s", self.engine.num_in_flight, timeout)
        await self.engine.shutdown(timeout)
        await self.stop_frontends()

    async def stop_frontends(self) -> None:
        """Stop HTTP and gRPC without touching the engine (it may serve other front-ends)."""
        if self._health_task is not None:
            self._health_task.cancel()
            self._health_task = None
        if self._grpc is not None:
            await self._grpc.stop(grace_s=2.0)
            self._grpc = None
        if self._uvicorn is not None and self._http_task is not None:
            self._uvicorn.should_exit = True
            await self._http_task
            self._uvicorn = None
        self.serving.close()
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    def banner(self) -> str:
        cfg, startup = self.engine.config, self.engine.startup
        lines = [
            f"jserve {self.serving.card.name}: {cfg.model.dtype}, "
            f"max_model_len {startup.max_model_len}, max_num_seqs {startup.max_num_seqs}, "
            f"tp {cfg.parallel.tensor_parallel_size}",
            f"  {startup.describe_pool()}",
            f"  start-up (load + compile): {startup.startup_seconds:.1f} s",
            f"  HTTP  {self.base_url}/v1  (OpenAI-compatible; /health /metrics)",
        ]
        if self.grpc_port is not None:
            lines.append(f"  gRPC  {self.grpc_target}  (jserve.v1.Generation, health, reflection)")
        if self.config.api_key:
            lines.append("  API key required (Authorization: Bearer ...)")
        return "\n".join(lines)


async def serve_until_signal(server: RunningServer) -> None:
    """Start ``server``, log the banner, drain and stop on SIGTERM / SIGINT (a second one forces)."""
    await server.start()
    log.info("%s", server.banner())
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = 0

    def on_signal(sig: signal.Signals) -> None:
        nonlocal signals
        signals += 1
        if signals > 1:
            log.warning("second %s: aborting in-flight requests", sig.name)
            server.engine.abort_all()
        else:
            log.info("%s received: draining (up to %.1f s)", sig.name, server.config.shutdown_timeout_s)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        await stop.wait()
        await server.shutdown()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    log.info("server stopped")
