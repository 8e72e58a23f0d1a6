"""Serving: the front-end-neutral part of handling a request (model check, tokenize, limits).

Where it sits: between the protocol front-ends (server/http_app.py, server/grpc_service.py)
and ``AsyncEngine``. Both front-ends go through the same checks, so a request rejected over HTTP
is rejected the same way over gRPC::

    model name --check_model--> 404 if unknown
    text / messages --tokenize / render_chat--> prompt token ids (400 without a tokenizer)
    sampling fields + max_tokens --make_params--> SamplingParams (400: prompt or max_tokens
                                                  over the context, bad values)
    start() --> AsyncEngine.add_request --> RequestStream (429 queue full, 503 draining)
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from jserve.async_engine import AsyncEngine, RequestStream
from jserve.outputs import Logprob
from jserve.sampling_params import SamplingParams
from server.errors import APIError, bad_request, from_exception
from server.protocol import Prompt

MAX_N = 128          # sequences per request (OpenAI's limit); each one is a scheduler request


@dataclass(frozen=True)
class ModelCard:
    """What /v1/models and ListModels report for the served model."""

    name: str
    root: str
    max_model_len: int
    vocab_size: int
    created: int


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class Serving:
    """One served model over one AsyncEngine; ``names`` are the model ids clients may send."""

    def __init__(self, engine: AsyncEngine, names: list[str], root: str) -> None:
        if not names:
            raise ValueError("served model names: at least one is needed")
        self.engine = engine
        self.names = list(names)
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self.card = ModelCard(names[0], root, engine.max_model_len, engine.config.model.vocab_size,
                              int(time.time()))

    # ------------------------------------------------------------------ checks
    def check_model(self, model: str | None) -> str:
        """The canonical model name; ``None`` / "" means the served model."""
        if not model or model in self.names:
            return self.card.name
        raise APIError(404, f"the model '{model}' does not exist; this server serves "
                            f"{', '.join(repr(n) for n in self.names)}", "model")

    def _need_tokenizer(self, what: str) -> None:
        if self.tokenizer is None:
            raise bad_request(f"{what} needs a tokenizer, and this model has none (random weights); "
                              "send token ids instead")

    def tokenize(self, prompt: Prompt, add_special_tokens: bool = True) -> list[int]:
        """Text -> ids (ids pass through; the engine checks their range)."""
        if isinstance(prompt, list):
            return prompt
        self._need_tokenizer("a text prompt")
        if not prompt:
            raise bad_request("'prompt' must not be empty", "prompt")
        return self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    tools: list[dict[str, Any]] | None = None,
                    template_kwargs: dict[str, Any] | None = None) -> list[int]:
        """Messages -> chat template -> ids (no second BOS: the template has it, as in LLM.chat)."""
        self._need_tokenizer("chat")
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt, tools,
                                                      template_kwargs=template_kwargs)
        except ValueError as e:
            raise bad_request(str(e), "messages") from e
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        self._need_tokenizer("detokenize")
        vocab = self.card.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise bad_request(f"token id {bad[0]} is out of range [0, {vocab})", "tokens")
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    @staticmethod
    def token_text(token_id: int, lp: Logprob) -> str:
        """How a token is named in logprobs: its decoded text, or 'token_id:N' without a tokenizer."""
        return lp.decoded_token if lp.decoded_token is not None else f"token_id:{token_id}"

    def make_params(self, sampling: dict[str, Any], max_tokens: int | None, logprobs: int | None,
                    prompt_len: int, prompt_field: str = "prompt") -> SamplingParams:
        """SamplingParams with ``max_tokens`` checked against (or defaulted to) what fits."""
        n = sampling.get("n", 1)
        if isinstance(n, int) and n > MAX_N:
            raise bad_request(f"'n' must be <= {MAX_N}, got {n}", "n")
        limit = self.max_model_len
        if prompt_len >= limit:
            raise bad_request(f"this model's maximum context length is {limit} tokens, but the "
                              f"{prompt_field} has {prompt_len} tokens (at least one token must be "
                              "left for the completion)", prompt_field)
        if max_tokens is None:
            max_tokens = limit - prompt_len
        elif max_tokens >= 1 and prompt_len + max_tokens > limit:
            raise bad_request(f"this model's maximum context length is {limit} tokens; you requested "
                              f"{prompt_len + max_tokens} tokens ({prompt_len} in the {prompt_field}, "
                              f"{max_tokens} in the completion); reduce max_tokens or the "
                              f"{prompt_field}", "max_tokens")
        try:
            return SamplingParams(**sampling, max_tokens=max_tokens, logprobs=logprobs)
        except (ValueError, TypeError) as e:
            raise bad_request(str(e).replace("SamplingParams.", "")) from e

    async def start(self, prompt_ids: list[int], params: SamplingParams,
                    request_id: str, cache_salt: str | None = None) -> RequestStream:
        """Queue the request; engine errors become APIErrors (400 / 429 / 503)."""
        try:
            return await self.engine.add_request(prompt_ids, params, request_id, cache_salt)
        except Exception as e:
            raise from_exception(e) from e
