"""AccessLog: one log line per HTTP request (method, path, status, tokens, latency), as vLLM's.

Where it sits: the outermost ASGI layer of the HTTP app (server/http_app.py wraps its Starlette
app in it). It sees the response status as it is sent and writes the line when the last body
part has gone (for a stream: after ``data: [DONE]``), so the latency is the whole response::

    INFO jserve.access: POST /v1/chat/completions 200 tokens=24+16 1234.5 ms

``tokens`` = prompt + completion tokens, for the generation endpoints: the handler records them
in ``request.state.tokens`` (``TokenCount``, updated as a stream goes). Probes and scrapes
(``/health``, ``/metrics``) log at DEBUG, so a scraper does not flood the log; everything else
at INFO on the ``jserve.access`` logger.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("jserve.access")
QUIET_PATHS = frozenset({"/health", "/metrics"})


@dataclass
class TokenCount:
    """Tokens of one API request, filled in by the handler (``request.state.tokens``)."""

    prompt: int = 0
    completion: int = 0


class AccessLog:
    """ASGI middleware: one line per HTTP request once its response is complete (or the client
    left: status 499 when no response had started)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 499
        logged = False
        state = scope.setdefault("state", {})

        def write() -> None:
            nonlocal logged
            if logged:
                return
            logged = True
            path = scope.get("path", "")
            level = logging.DEBUG if path in QUIET_PATHS else logging.INFO
            if not log.isEnabledFor(level):
                return
            tokens = state.get("tokens")
            text = f" tokens={tokens.prompt}+{tokens.completion}" if tokens is not None else ""
            log.log(level, "%s %s %d%s %.1f ms", scope.get("method", ""), path, status, text,
                    (time.perf_counter() - t0) * 1e3)

        async def send_logged(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                write()

        try:
            await self.app(scope, receive, send_logged)
        finally:
            write()
