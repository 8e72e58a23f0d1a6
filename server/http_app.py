"""The OpenAI-compatible HTTP API (a Starlette app, served by uvicorn).

Where it sits: the HTTP front door. Each route reads a size-capped JSON body, checks the API
key, parses it (server/protocol.py) and hands it to the handlers (server/openai_handlers.py);
every failure becomes the OpenAI error JSON with its status (server/errors.py).

    POST /v1/completions        POST /v1/chat/completions   (stream: SSE, ends "data: [DONE]")
    GET  /v1/models             GET  /v1/models/{id}
    POST /tokenize              POST /detokenize
    GET  /health                GET  /metrics               GET  /version

Bodies: at most ``max_body_bytes`` (413), read within ``body_timeout_s`` (408), decoded by
server/json_body.py (depth, lone surrogates, huge numbers: 400 naming the path). A 429 carries
``Retry-After``. A client that goes away (mid-upload, mid-stream) or a request refused while
draining is logged at DEBUG, never as an ERROR traceback; only a 500 is.

Every request is logged once its response is complete (server/access_log.py: method, path,
status, prompt + completion tokens, latency; INFO, /health and /metrics at DEBUG).

Disconnects: a streamed response and a non-streamed request both watch the connection; when
the client goes away the handler is cancelled, which aborts the engine requests (pages freed).
/health and /metrics need no API key (probes and scrapers); everything else does when one is set.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

import jserve
from jserve.engine_api import EngineHealth
from server.access_log import AccessLog
from server.errors import KNOWN_STATUSES, APIError, bad_request, from_exception
from server.json_body import parse_json_body
from server.metrics import CONTENT_TYPE, PrometheusStats
from server.openai_handlers import ChatHandler, CompletionHandler
from server.protocol import (
    check_messages,
    get_bool,
    get_int_list,
    get_str,
    parse_chat_request,
    parse_completion_request,
)
from server.request_fields import DETOKENIZE, TOKENIZE, check_fields
from server.serving import Serving

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
DEFAULT_BODY_TIMEOUT_S = 30.0


def error_response(err: APIError) -> JSONResponse:
    headers = {}
    if err.retry_after_s is not None:
        headers["Retry-After"] = str(err.retry_after_s)
    if err.status in (408, 413):     # the rest of the body is never read: end the connection
        headers["Connection"] = "close"
    return JSONResponse(err.to_json(), status_code=err.status, headers=headers)


class ClientGone(Exception):
    """The client closed the connection before the response was ready."""


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnect(receive: Receive, work: Awaitable[Any]) -> Any:
    """Await ``work``; cancel it (and raise ClientGone) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(receive))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        try:
            await task
        except (asyncio.CancelledError, Exception):
            pass
        raise ClientGone()
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()


class SSEResponse(Response):
    """Server-sent events from an async iterator of JSON-able objects, then ``data: [DONE]``.

    The producer runs next to a disconnect watcher; a disconnect cancels it (which aborts the
    engine requests through the handler's ``finally``). An error after the stream started is
    sent as one ``data: {"error": ...}`` event before ``[DONE]``.
    """

    media_type = "text/event-stream"

    def __init__(self, chunks: AsyncIterator[dict[str, Any]]) -> None:
        # No body: init_headers then sets no content-length (the stream is chunked).
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._chunks = chunks

    async def _produce(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        while True:
            try:
                chunk = await anext(self._chunks)
            except StopAsyncIteration:
                break
            except Exception as e:  # the engine or the handler failed: tell the client, then end
                err = from_exception(e)
                if err.status == 500:
                    log.error("stream failed: %s", err.message)
                data = b"data: " + json.dumps(err.to_json()).encode() + b"\n\n"
                await send({"type": "http.response.body", "body": data, "more_body": True})
                break
            data = b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"
            await send({"type": "http.response.body", "body": data, "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await until_disconnect(receive, self._produce(send))
        except ClientGone:
            log.debug("client disconnected mid-stream")
        finally:
            await self._chunks.aclose()


class OpenAIApp:
    """Routes over one ``Serving``; ``stats`` feeds /metrics (None: /metrics is 404)."""

    def __init__(self, serving: Serving, stats: PrometheusStats | None = None, api_key: str | None = None,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S) -> None:
        self.serving = serving
        self.stats = stats
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.completions = CompletionHandler(serving)
        self.chat = ChatHandler(serving)

    # ------------------------------------------------------------------ plumbing
    def _check_key(self, request: Request) -> None:
        if not self.api_key:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                 self.api_key.encode()):
            raise APIError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')")

    async def _json(self, request: Request) -> dict[str, Any]:
        limit = self.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise APIError(413, f"request body of {length} bytes exceeds the limit of {limit} bytes")
        body = bytearray()
        try:
            async with asyncio.timeout(self.body_timeout_s):
                async for part in request.stream():
                    body += part
                    if len(body) > limit:
                        raise APIError(413, f"request body exceeds the limit of {limit} bytes")
        except TimeoutError:
            raise APIError(408, f"the request body was not received within {self.body_timeout_s:g} s "
                                f"({len(body)} bytes arrived)") from None
        except ClientDisconnect:
            raise ClientGone() from None
        return parse_json_body(bytes(body))

    def _guard(self, fn: Callable[[Request], Awaitable[Response]], auth: bool = True
               ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            try:
                if auth:
                    self._check_key(request)
                return await fn(request)
            except ClientGone:
                log.debug("client disconnected before the response (%s)", request.url.path)
                return Response(status_code=499)
            except Exception as e:
                err = from_exception(e)
                if err.status == 500:
                    log.exception("%s failed", request.url.path)
                else:
                    log.debug("%s %s: %d %s", request.method, request.url.path, err.status, err.message)
                return error_response(err)
        return endpoint

    # ------------------------------------------------------------------ generation
    async def _generate(self, request: Request, handler: CompletionHandler | ChatHandler,
                        parse: Callable[[dict[str, Any]], Any]) -> Response:
        req = parse(await self._json(request))
        started = await handler.start(req)
        request.state.tokens = started.tokens
        if req.stream:
            return SSEResponse(handler.stream(req, started))
        try:
            body = await until_disconnect(request.receive, handler.full(req, started))
        finally:
            started.abort()
        return JSONResponse(body)

    async def create_completion(self, request: Request) -> Response:
        return await self._generate(request, self.completions, parse_completion_request)

    async def create_chat_completion(self, request: Request) -> Response:
        return await self._generate(request, self.chat, parse_chat_request)

    # ------------------------------------------------------------------ the rest
    def _model_card(self, name: str) -> dict[str, Any]:
        c = self.serving.card
        return {"id": name, "object": "model", "created": c.created, "owned_by": "jserve", "root": c.root,
                "parent": None, "max_model_len": c.max_model_len, "vocab_size": c.vocab_size}

    async def list_models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self._model_card(n) for n in self.serving.names]})

    async def retrieve_model(self, request: Request) -> Response:
        name = request.path_params["model"]
        if name not in self.serving.names:
            self.serving.check_model(name)      # raises the 404 naming the served models
        return JSONResponse(self._model_card(name))

    async def tokenize(self, request: Request) -> Response:
        body = await self._json(request)
        check_fields(body, TOKENIZE)
        self.serving.check_model(get_str(body, "model"))
        if "messages" in body:
            messages = check_messages(body["messages"])
            ids = await self.serving.render_chat(messages, get_bool(body, "add_generation_prompt", True))
        elif "prompt" in body:
            prompt = body["prompt"]
            if not isinstance(prompt, str):
                raise bad_request("'prompt' must be a string", "prompt")
            ids = await self.serving.tokenize(prompt, get_bool(body, "add_special_tokens", True))
        else:
            raise bad_request("'prompt' or 'messages' is required", "prompt")
        strs = None
        if get_bool(body, "return_token_strs", False):
            strs = [self.serving.tokenizer.id_to_token(t) for t in ids]
        return JSONResponse({"count": len(ids), "max_model_len": self.serving.max_model_len, "tokens": ids,
                             "token_strs": strs})

    async def detokenize(self, request: Request) -> Response:
        body = await self._json(request)
        check_fields(body, DETOKENIZE)
        self.serving.check_model(get_str(body, "model"))
        if "tokens" not in body:
            raise bad_request("'tokens' is required", "tokens")
        ids = get_int_list(body, "tokens")
        return JSONResponse({"prompt": self.serving.decode(ids)})

    async def health(self, request: Request) -> Response:
        health = self.serving.engine.health()
        if health is EngineHealth.SERVING:
            return Response(status_code=200)
        return error_response(APIError(503, f"not serving: {health.value}"))

    async def metrics(self, request: Request) -> Response:
        if self.stats is None:
            return error_response(APIError(404, "metrics are disabled"))
        return Response(self.stats.render(), media_type=CONTENT_TYPE)

    async def version(self, request: Request) -> Response:
        return JSONResponse({"version": _version()})

    def build(self) -> Starlette:
        g = self._guard
        routes = [
            Route("/v1/completions", g(self.create_completion), methods=["POST"]),
            Route("/v1/chat/completions", g(self.create_chat_completion), methods=["POST"]),
            Route("/v1/models", g(self.list_models), methods=["GET"]),
            Route("/v1/models/{model:path}", g(self.retrieve_model), methods=["GET"]),
            Route("/tokenize", g(self.tokenize), methods=["POST"]),
            Route("/detokenize", g(self.detokenize), methods=["POST"]),
            Route("/health", g(self.health, auth=False), methods=["GET"]),
            Route("/metrics", g(self.metrics, auth=False), methods=["GET"]),
            Route("/version", g(self.version, auth=False), methods=["GET"]),
        ]

        async def http_error(request: Request, exc: HTTPException) -> Response:
            status = exc.status_code if exc.status_code in KNOWN_STATUSES else 400
            return error_response(APIError(status, f"{exc.detail}: {request.method} {request.url.path}"))

        return Starlette(routes=routes, exception_handlers={HTTPException: http_error},
                         middleware=[Middleware(AccessLog)])


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("jserve")
    except Exception:
        return getattr(jserve, "__version__", "unknown")


def build_http_app(serving: Serving, stats: PrometheusStats | None = None, api_key: str | None = None,
                   max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                   body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S) -> Starlette:
    return OpenAIApp(serving, stats, api_key, max_body_bytes, body_timeout_s).build()


__all__ = ["build_http_app", "OpenAIApp", "SSEResponse"]
