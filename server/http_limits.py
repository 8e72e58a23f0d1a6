"""Connection limits of the HTTP server: a cap on open connections and a deadline for request
headers (uvicorn has neither in this form).

Where it sits: runtime.py hands the class made by ``limited_protocol`` to uvicorn as its HTTP
protocol. A connection past ``max_connections`` gets an OpenAI-shaped 503 (with
``Retry-After``) and is closed at once, before it costs anything more than the accept. A
connection that opens and sends nothing, or sends part of a request line / headers and stalls,
would hold a file descriptor forever under plain uvicorn; here it is closed once
``header_timeout_s`` passes without complete headers (counted from the connection, or from the
data that starts the next request on a keep-alive connection). The body has its own deadline
in the app (server/http_app.py: 408)::

    connect --headers--> [request] --body--> [app]            keep-alive: idle -> closed
       |<- header_timeout_s ->|       |<- body_timeout_s ->|   after timeout_keep_alive
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)


def _refusal(max_connections: int) -> bytes:
    body = json.dumps({"error": {
        "message": f"too many open connections (this server accepts {max_connections}); retry later",
        "type": "service_unavailable", "param": None, "code": 503}}).encode()
    return (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
            b"retry-after: 1\r\nconnection: close\r\ncontent-length: %d\r\n\r\n" % len(body)) + body


def limited_protocol(header_timeout_s: float, max_connections: int) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a header deadline and a cap on open connections."""
    refusal = _refusal(max_connections)

    class LimitedH11(H11Protocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                log.info("refusing a connection from %s: %d open (--max-connections %d)", self.client,
                         len(self.connections) - 1, max_connections)
                transport.write(refusal)
                transport.close()
                return
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is h11.IDLE:   # still waiting for a whole request head
                self._arm()
            else:
                self._disarm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(header_timeout_s, self._expire)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _expire(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                log.info("closing a connection from %s: no complete request headers within %g s",
                         self.client, header_timeout_s)
                self.transport.close()

    return LimitedH11
