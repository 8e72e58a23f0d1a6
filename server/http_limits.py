"""Per-connection limits of the HTTP server: a deadline for request headers (uvicorn has none).

Where it sits: runtime.py hands ``HeaderTimeoutH11`` to uvicorn as its HTTP protocol class. A
connection that opens and sends nothing, or sends part of a request line / headers and stalls,
holds a file descriptor forever under plain uvicorn; here it is closed once
``header_timeout_s`` passes without complete headers (counted from the connection, or from the
end of the previous response on a keep-alive connection). The body has its own deadline in the
app (server/http_app.py: 408), and the number of connections is capped by uvicorn's
``limit_concurrency`` (503 past it)::

    connect --headers--> [request] --body--> [app]            keep-alive: idle -> closed
       |<- header_timeout_s ->|       |<- body_timeout_s ->|   after timeout_keep_alive
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)


def header_timeout_protocol(header_timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a header deadline of ``header_timeout_s`` seconds."""

    class HeaderTimeoutH11(H11Protocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
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

    return HeaderTimeoutH11
