"""APIError: one error type for both front-ends, mapped to an HTTP status and a gRPC code.

Where it sits: raised by request parsing (server/protocol.py), the serving layer
(server/serving.py) and mapped from engine exceptions by ``from_exception``; the HTTP app
renders it as the OpenAI error JSON, the gRPC service aborts the call with its code::

    ValueError (bad input)       -> 400 invalid_request_error  INVALID_ARGUMENT
    unknown model                -> 404 not_found_error        NOT_FOUND
    body not sent in time        -> 408 invalid_request_error  DEADLINE_EXCEEDED
    body / message too large     -> 413 invalid_request_error  RESOURCE_EXHAUSTED
    QueueFullError               -> 429 rate_limit_error       RESOURCE_EXHAUSTED (transient:
                                    HTTP ``Retry-After``, gRPC trailing metadata ``retry-after``)
    missing / wrong API key      -> 401 authentication_error   UNAUTHENTICATED
    draining / engine stopped    -> 503 service_unavailable    UNAVAILABLE
    a failed engine step, a bug  -> 500 internal_error         INTERNAL
"""

from __future__ import annotations

import re

import grpc

from jserve.async_engine import EngineDeadError, EngineDrainingError, RequestFailedError
from jserve.engine_api import QueueFullError

_KINDS: dict[int, tuple[str, grpc.StatusCode]] = {
    400: ("invalid_request_error", grpc.StatusCode.INVALID_ARGUMENT),
    401: ("authentication_error", grpc.StatusCode.UNAUTHENTICATED),
    404: ("not_found_error", grpc.StatusCode.NOT_FOUND),
    405: ("invalid_request_error", grpc.StatusCode.UNIMPLEMENTED),
    408: ("invalid_request_error", grpc.StatusCode.DEADLINE_EXCEEDED),
    413: ("invalid_request_error", grpc.StatusCode.RESOURCE_EXHAUSTED),
    429: ("rate_limit_error", grpc.StatusCode.RESOURCE_EXHAUSTED),
    500: ("internal_error", grpc.StatusCode.INTERNAL),
    503: ("service_unavailable", grpc.StatusCode.UNAVAILABLE),
}


KNOWN_STATUSES = frozenset(_KINDS)
_FIELD_PREFIX = re.compile(r"([a-z_]+): ")
RETRY_AFTER_S = 1       # what a 429 tells the client to wait: the queue drains within steps


class APIError(Exception):
    """A request-level error: ``status`` (HTTP), ``message``, the offending ``param`` if known,
    and for a transient refusal (429) how many seconds to wait before retrying."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 retry_after_s: int | None = None) -> None:
        if status not in _KINDS:
            raise ValueError(f"APIError: unsupported status {status}")
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.retry_after_s = retry_after_s

    @property
    def type(self) -> str:
        return _KINDS[self.status][0]

    @property
    def grpc_code(self) -> grpc.StatusCode:
        return _KINDS[self.status][1]

    def to_json(self) -> dict:
        """The OpenAI error body."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.status}}


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param)


def from_exception(exc: BaseException) -> APIError:
    """Map an exception from the engine / tokenizer path to an APIError."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, QueueFullError):
        return APIError(429, f"too many requests: {exc}", retry_after_s=RETRY_AFTER_S)
    if isinstance(exc, (EngineDrainingError, EngineDeadError)):
        return APIError(503, str(exc))
    if isinstance(exc, RequestFailedError):
        return APIError(500, str(exc))
    if isinstance(exc, ValueError):   # the engine words these "field: what is wrong"
        m = _FIELD_PREFIX.match(str(exc))
        return APIError(400, str(exc), m.group(1) if m else None)
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}")
