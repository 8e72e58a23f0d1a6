"""The ``jserve`` console script: jserve's own commands plus ``serve`` and ``bench``.

Where it sits: the outermost shell. jserve/cli.py owns the parser and the offline commands
(``generate``, ``plan``); this module adds the two that need the server package, so the
dependency arrow stays ``server -> jserve``::

    jserve serve --model DIR_OR_SHAPE [--random-weights] [--port 8000] [--grpc-port 50051]
    jserve bench --base-url http://127.0.0.1:8000 --concurrency 1,2,4
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from collections.abc import Sequence

from jserve.cli import (
    add_engine_flags,
    build_parser_and_subcommands,
    configure_logging,
    engine_args_from,
    run_command,
)
from server.bench import add_bench_flags, cmd_bench
from server.tool_parsers import PARSERS

log = logging.getLogger("jserve.server")


def _cmd_serve(ns: argparse.Namespace) -> int:
    from jserve.async_engine import AsyncEngine
    from jserve.builder import DEFAULT_MODELS, build_engine
    from server.metrics import PrometheusStats
    from server.runtime import RunningServer, ServerConfig, serve_until_signal

    config = ServerConfig(
        host=ns.host, port=ns.port, grpc_port=None if ns.grpc_port < 0 else ns.grpc_port,
        api_key=ns.api_key, served_model_names=tuple(ns.served_model_name or ()),
        max_body_bytes=ns.max_body_bytes, shutdown_timeout_s=ns.shutdown_timeout,
        enable_metrics=not ns.disable_metrics, access_log=ns.access_log,
        header_timeout_s=ns.header_timeout, body_timeout_s=ns.body_timeout,
        max_connections=ns.max_connections, tokenizer_threads=ns.tokenizer_threads,
        tool_call_parser=ns.tool_call_parser)
    args = engine_args_from(ns)
    t0 = time.perf_counter()
    engine = build_engine(args)
    log.info("engine built in %.1f s", time.perf_counter() - t0)
    model_name = ns.model or DEFAULT_MODELS[0]  # no --model: the bundled default model
    name = (config.served_model_names or (model_name,))[0]
    stats = PrometheusStats.for_engine(name, engine) if config.enable_metrics else None
    server = RunningServer(AsyncEngine(engine, stats), config, model_name, stats)
    asyncio.run(serve_until_signal(server))
    return 0


def add_serve_flags(p: argparse.ArgumentParser) -> None:
    """The engine flags ``serve`` exposes (declared in jserve/options.py, ``--max-waiting``
    among them), then the server's own: front-end settings with no meaning to ``LLM(...)``,
    whose defaults are declared once, on ``ServerConfig``."""
    from server.runtime import ServerConfig as D

    add_engine_flags(p, "serve")
    p.add_argument("--host", default=D.host,
                   help="bind address (0.0.0.0 for all interfaces) (default: %(default)s)")
    p.add_argument("--port", type=int, default=D.port,
                   help="HTTP port (0: a free port) (default: %(default)s)")
    p.add_argument("--grpc-port", type=int, default=D.grpc_port,
                   help="gRPC port (0: a free port, -1: off) (default: %(default)s)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' (HTTP and gRPC) (default: no key)")
    p.add_argument("--served-model-name", action="append", default=None,
                   help="model id(s) clients send (repeatable; default: the --model string)")
    p.add_argument("--max-body-bytes", type=int, default=D.max_body_bytes,
                   help="largest request body / gRPC message (413 / RESOURCE_EXHAUSTED past it; "
                   "default: %(default)s)")
    p.add_argument("--header-timeout", type=float, default=D.header_timeout_s,
                   help="seconds a connection may take to send complete request headers before it "
                   "is closed (default: %(default)s)")
    p.add_argument("--body-timeout", type=float, default=D.body_timeout_s,
                   help="seconds a request body may take to arrive; past it: 408 (default: %(default)s)")
    p.add_argument("--max-connections", type=int, default=D.max_connections,
                   help="open HTTP connections; one past it gets a 503 and is closed "
                   "(default: %(default)s)")
    p.add_argument("--tokenizer-threads", type=int, default=D.tokenizer_threads,
                   help="worker threads that tokenize prompts off the event loop (default: %(default)s)")
    p.add_argument("--shutdown-timeout", type=float, default=D.shutdown_timeout_s,
                   help="seconds SIGTERM waits for in-flight requests before aborting them "
                   "(default: %(default)s)")
    p.add_argument("--tool-call-parser", default=None, choices=sorted(PARSERS),
                   help="format of the model's tool calls, parsed out for tool_choice 'auto' "
                   "(default: none: 'auto' is refused; 'required' and named functions always work)")
    p.add_argument("--disable-metrics", action="store_true",
                   help="no Prometheus /metrics (default: metrics on)")
    p.add_argument("--access-log", action="store_true",
                   help="uvicorn's access log, beside jserve's own line per request (default: off)")


def build_full_parser() -> argparse.ArgumentParser:
    parser, sub = build_parser_and_subcommands()
    s = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API and the gRPC API")
    add_serve_flags(s)
    s.set_defaults(func=_cmd_serve)
    b = sub.add_parser("bench", help="load-test a running server (HTTP or gRPC)")
    add_bench_flags(b)
    b.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_full_parser()
    ns = parser.parse_args(argv)
    configure_logging(ns.log_level)
    return run_command(ns)


if __name__ == "__main__":
    sys.exit(main())
