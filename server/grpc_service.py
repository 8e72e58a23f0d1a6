"""The gRPC API: service ``jserve.v1.Generation`` plus grpc.health.v1 and server reflection.

Where it sits: the gRPC front door, next to the HTTP app; both go through server/serving.py, so
the same request gets the same checks and the same tokens. ``Generate`` streams one message per
engine output that changed something (new tokens, text, or a finish), the last one with usage.
Cancelling the call (client gone, deadline) cancels the handler, which aborts the engine request
and frees its pages. Errors abort the call with the code from server/errors.py.

Health: "" and "jserve.v1.Generation" report SERVING, NOT_SERVING once draining or once the
engine loop has ended (the runtime follows ``AsyncEngine.health()``). Reflection
lists Generation, Health and Reflection, so ``grpcurl -plaintext HOST:PORT list`` works without
the .proto. The API key, when set, is checked on Generation's methods only (metadata
``authorization: Bearer <key>``); health and reflection stay open like /health.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from google.protobuf.unknown_fields import UnknownFieldSet
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from jserve.async_engine import CompletionDelta, DeltaTracker
from jserve.outputs import RequestOutput
from server.errors import APIError, bad_request, from_exception
from server.proto import jserve_pb2 as pb
from server.proto import jserve_pb2_grpc as pb_grpc
from server.protocol import check_n_greedy, get_stop, get_stop_token_ids
from server.serving import Serving, new_id
from server.structured_request import mask_fields

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Generation"].full_name   # "jserve.v1.Generation"
_OPTIONAL_SAMPLING = ("n", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                      "presence_penalty", "frequency_penalty", "seed", "min_tokens",
                      "include_stop_str_in_output", "ignore_eos", "skip_special_tokens")


def sampling_fields(sp: pb.SamplingParams) -> tuple[dict[str, Any], int | None, int | None]:
    """(SamplingParams keywords, max_tokens, logprobs) from the proto; unset fields are omitted.
    The same limits as HTTP (server/protocol.py): stop strings and ids, n > 1 needs sampling."""
    fields = {name: getattr(sp, name) for name in _OPTIONAL_SAMPLING if sp.HasField(name)}
    fields["stop"] = get_stop({"stop": list(sp.stop)})
    fields["stop_token_ids"] = get_stop_token_ids({"stop_token_ids": list(sp.stop_token_ids)})
    check_n_greedy(fields.get("n", 1), fields.get("temperature", 1.0))
    max_tokens = sp.max_tokens if sp.HasField("max_tokens") else None
    if max_tokens == 0:
        raise bad_request("'max_tokens' must be >= 1, got 0", "max_tokens")
    logprobs = sp.logprobs if sp.HasField("logprobs") else None
    fields.update(_mask_fields(sp))
    return fields, max_tokens, logprobs


def _mask_fields(sp: pb.SamplingParams) -> dict[str, Any]:
    """structured_outputs, logit_bias, allowed_token_ids, bad_words (checked as over HTTP)."""
    body: dict[str, Any] = {}
    if sp.HasField("structured_outputs"):
        so = sp.structured_outputs
        kind = so.WhichOneof("kind")
        if kind is None:
            raise bad_request("'structured_outputs' must set one of json, json_object, regex, "
                              "choice, grammar", "structured_outputs")
        if kind == "json":
            try:
                value: Any = json.loads(so.json)
            except json.JSONDecodeError as e:
                raise bad_request(f"'structured_outputs.json' is not valid JSON: {e}",
                                  "structured_outputs") from None
        elif kind == "choice":
            value = list(so.choice.values)
        else:
            value = getattr(so, kind)
        body["structured_outputs"] = {kind: value}
    if sp.logit_bias:
        body["logit_bias"] = {str(k): v for k, v in sp.logit_bias.items()}
    if sp.allowed_token_ids:
        body["allowed_token_ids"] = list(sp.allowed_token_ids)
    if sp.bad_words:
        body["bad_words"] = list(sp.bad_words)
    return mask_fields(body)[0]


def _choice(d: CompletionDelta) -> pb.Choice:
    c = pb.Choice(index=d.index, token_ids=d.token_ids, text=d.text, finish_reason=d.finish_reason or "")
    if isinstance(d.stop_reason, str):
        c.stop_string = d.stop_reason
    elif isinstance(d.stop_reason, int):
        c.stop_token_id = d.stop_reason
    for tid, entry in zip(d.token_ids, d.logprobs or [], strict=False):
        lp = pb.TokenLogprob(token_id=tid, logprob=entry[tid].logprob)
        ranked = sorted(((t, e) for t, e in entry.items() if e.rank is not None), key=lambda x: x[1].rank)
        for t, e in ranked:
            lp.top.add(token_id=t, logprob=e.logprob, token=e.decoded_token or "")
        c.logprobs.append(lp)
    return c


def _usage(out: RequestOutput) -> pb.Usage:
    prompt = len(out.prompt_token_ids)
    completion = sum(len(c.token_ids) for c in out.outputs)
    return pb.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                    cached_tokens=out.num_cached_tokens)


class GenerationService(pb_grpc.GenerationServicer):
    def __init__(self, serving: Serving, api_key: str | None = None) -> None:
        self.serving = serving
        self.api_key = api_key

    def _check_key(self, context: grpc.aio.ServicerContext) -> None:
        if not self.api_key:
            return
        meta = dict(context.invocation_metadata() or ())
        scheme, _, token = str(meta.get("authorization", "")).partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                 self.api_key.encode()):
            raise APIError(401, "missing or invalid API key (metadata 'authorization: Bearer <key>')")

    @staticmethod
    async def _abort(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
        err = from_exception(exc)
        if err.status == 500 and not isinstance(exc, APIError):
            log.error("gRPC request failed: %s", err.message)
        trailing = (("retry-after", str(err.retry_after_s)),) if err.retry_after_s is not None else ()
        await context.abort(err.grpc_code, err.message, trailing_metadata=trailing)

    async def _prompt_ids(self, request: pb.GenerateRequest) -> list[int]:
        kind = request.WhichOneof("prompt")
        if kind == "text":
            return await self.serving.tokenize(request.text, field_name="text")
        if kind == "token_ids":
            if not request.token_ids.ids:
                raise bad_request("token_ids: must contain at least one token", "token_ids")
            return list(request.token_ids.ids)
        raise bad_request("a prompt is required: set 'text' or 'token_ids'", "prompt")

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[pb.GenerateResponse]:
        rid = request.request_id or new_id("grpc")
        try:
            self._check_key(context)
            self.serving.check_model(request.model)
            fields, max_tokens, logprobs = sampling_fields(request.sampling_params)
            self.serving.check_sequences(fields.get("n", 1), 1)
            ids = await self._prompt_ids(request)
            params = self.serving.make_params(fields, max_tokens, logprobs, len(ids),
                                              request.WhichOneof("prompt") or "prompt")
            stream = await self.serving.start(ids, params, f"{rid}-{new_id('g')}",
                                              request.cache_salt or None, request.priority)
        except Exception as e:
            await self._abort(context, e)
            return
        async with stream:
            tracker, first = DeltaTracker(), True
            try:
                async for out in stream:
                    choices = [_choice(d) for d in tracker.update(out)]
                    resp = pb.GenerateResponse(request_id=rid, choices=choices)
                    if first:
                        resp.prompt_token_ids.extend(ids)
                        first = False
                    if out.finished:
                        resp.usage.CopyFrom(_usage(out))
                    yield resp
            except Exception as e:
                await self._abort(context, e)

    async def Tokenize(self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext
                       ) -> pb.TokenizeResponse:
        try:
            self._check_key(context)
            self.serving.check_model(request.model)
            add = request.add_special_tokens if request.HasField("add_special_tokens") else True
            ids = await self.serving.tokenize(request.text, add, field_name="text")
        except Exception as e:
            await self._abort(context, e)
        return pb.TokenizeResponse(token_ids=ids, count=len(ids), max_model_len=self.serving.max_model_len)

    async def Detokenize(self, request: pb.DetokenizeRequest, context: grpc.aio.ServicerContext
                         ) -> pb.DetokenizeResponse:
        try:
            self._check_key(context)
            self.serving.check_model(request.model)
            skip = request.skip_special_tokens if request.HasField("skip_special_tokens") else True
            text = self.serving.decode(list(request.token_ids), skip)
        except Exception as e:
            await self._abort(context, e)
        return pb.DetokenizeResponse(text=text)

    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
                         ) -> pb.ListModelsResponse:
        try:
            self._check_key(context)
        except Exception as e:
            await self._abort(context, e)
        c = self.serving.card
        return pb.ListModelsResponse(models=[
            pb.ModelInfo(id=name, max_model_len=c.max_model_len, vocab_size=c.vocab_size, owned_by="jserve",
                         root=c.root) for name in self.serving.names])


def _unknown_field(msg: Any, path: str) -> str | None:
    """The first field number this server's proto does not know (a newer client's field, which
    proto3 would otherwise keep and ignore), as ``path.#N``; None if there is none."""
    for f in UnknownFieldSet(msg):
        return f"{path}.#{f.field_number}" if path else f"#{f.field_number}"
    for fd, value in msg.ListFields():
        if fd.message_type is not None and not fd.is_repeated:
            found = _unknown_field(value, f"{path}.{fd.name}" if path else fd.name)
            if found:
                return found
    return None


async def _decode(raw: bytes, message: type, context: grpc.aio.ServicerContext) -> Any:
    """A request message from its bytes; INVALID_ARGUMENT (not UNKNOWN) when they do not decode
    (garbage, invalid UTF-8 in a string field) or carry a field this server does not know."""
    try:
        msg = message.FromString(raw)
    except DecodeError as e:
        log.debug("gRPC request did not decode as %s: %s", message.__name__, e)
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                            f"the request is not a valid {message.DESCRIPTOR.full_name} message: {e}")
    unknown = _unknown_field(msg, "")
    if unknown is not None:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                            f"unknown field {unknown} in {message.DESCRIPTOR.full_name}: this server "
                            "does not implement it (a newer jserve.proto?)")
    return msg


def _add_generation_service(service: GenerationService, server: grpc.aio.Server) -> None:
    """Register ``service`` taking raw request bytes, decoded by ``_decode`` (the generated
    registration decodes before the handler runs, so a bad message would be UNKNOWN)."""
    def unary(method: Any, message: type) -> grpc.RpcMethodHandler:
        async def handler(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
            return await method(await _decode(raw, message, context), context)
        return grpc.unary_unary_rpc_method_handler(handler, response_serializer=_serialize)

    def streaming(method: Any, message: type) -> grpc.RpcMethodHandler:
        async def handler(raw: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async for resp in method(await _decode(raw, message, context), context):
                yield resp
        return grpc.unary_stream_rpc_method_handler(handler, response_serializer=_serialize)

    handlers = {
        "Generate": streaming(service.Generate, pb.GenerateRequest),
        "Tokenize": unary(service.Tokenize, pb.TokenizeRequest),
        "Detokenize": unary(service.Detokenize, pb.DetokenizeRequest),
        "ListModels": unary(service.ListModels, pb.ListModelsRequest),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


def _serialize(message: Any) -> bytes:
    return message.SerializeToString()


class GrpcServer:
    """A started grpc.aio server bound to ``host:port`` (``port`` 0 picks a free one)."""

    def __init__(self, server: grpc.aio.Server, port: int, health_servicer: Any) -> None:
        self.server = server
        self.port = port
        self._health = health_servicer

    async def set_serving(self, serving: bool) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in ("", SERVICE_NAME):
            await self._health.set(name, status)

    async def stop(self, grace_s: float | None) -> None:
        await self.server.stop(grace_s)


async def start_grpc_server(serving: Serving, host: str = "127.0.0.1", port: int = 0,
                            api_key: str | None = None, max_message_bytes: int = 4 * 1024 * 1024
                            ) -> GrpcServer:
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", max_message_bytes),
                                      ("grpc.so_reuseport", 0)])
    _add_generation_service(GenerationService(serving, api_key), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"gRPC: cannot bind {host}:{port}")
    await server.start()
    result = GrpcServer(server, bound, health_servicer)
    await result.set_serving(True)
    return result
