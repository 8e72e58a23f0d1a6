"""Serving: the front-end-neutral part of handling a request (model check, tokenize, limits).

Where it sits: between the protocol front-ends (server/http_app.py, server/grpc_service.py)
and ``AsyncEngine``. Both front-ends go through the same checks, so a request rejected over HTTP
is rejected the same way over gRPC::

    model name --check_model--> 404 if unknown
    text / messages --tokenize / render_chat--> prompt token ids (400 without a tokenizer)
                     runs on a small worker pool, never on the event loop: one huge prompt
                     must not stall every other stream; text longer than ``max_prompt_chars``
                     is refused before tokenizing (it cannot fit ``max_model_len`` tokens)
    sampling fields + max_tokens --make_params--> SamplingParams (400: prompt or max_tokens
                                                  over the context, bad values, naming the
                                                  field the client sent)
    n x prompts --check_sequences--> 400 if the engine's queue could never hold them
    start() --> AsyncEngine.add_request --> RequestStream (429 queue full, 503 draining)

``max_prompt_chars`` = max_model_len x (longest vocabulary entry, in characters) x 2: a text
longer than that has more than max_model_len tokens whatever it says (the factor 2 covers
normalizers that merge characters). Tokenizers that drop characters (whitespace-splitting
ones) are not used by decoder-only chat models.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from jserve.async_engine import AsyncEngine, RequestStream
from jserve.outputs import Logprob
from jserve.sampling_params import SamplingParams, rename_fields
from server.errors import APIError, bad_request, from_exception
from server.protocol import Prompt
from server.tool_parsers import get_tool_parser

MAX_N = 128          # sequences per request (OpenAI's limit); each one is a scheduler request
DEFAULT_TOKENIZER_THREADS = 2
T = TypeVar("T")


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

    def __init__(self, engine: AsyncEngine, names: list[str], root: str,
                 tokenizer_threads: int = DEFAULT_TOKENIZER_THREADS,
                 tool_call_parser: str | None = None) -> None:
        if not names:
            raise ValueError("served model names: at least one is needed")
        if tokenizer_threads < 1:
            raise ValueError(f"tokenizer_threads must be >= 1, got {tokenizer_threads}")
        self.engine = engine
        self.names = list(names)
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self.max_waiting = engine.startup.max_waiting
        self.max_num_seqs = engine.startup.max_num_seqs
        self.card = ModelCard(names[0], root, engine.max_model_len, engine.config.model.vocab_size,
                              int(time.time()))
        self.max_prompt_chars = self.max_model_len * _longest_token_chars(self.tokenizer) * 2
        self._pool = ThreadPoolExecutor(tokenizer_threads, thread_name_prefix="jserve-tokenize")
        # --tool-call-parser (server/tool_parsers/): None = tool_choice "auto" is refused
        self.tool_call_parser = tool_call_parser
        if tool_call_parser is not None:
            get_tool_parser(tool_call_parser)   # an unknown name is a start-up error

    def close(self) -> None:
        """Stop the tokenizer pool (front-ends stopped: nothing submits any more)."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

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

    def _check_chars(self, chars: int, field_name: str) -> None:
        if chars > self.max_prompt_chars:
            raise bad_request(f"the {field_name} has {chars} characters, more than the "
                              f"{self.max_prompt_chars} that can fit this model's maximum context "
                              f"length of {self.max_model_len} tokens", field_name)

    async def tokenize(self, prompt: Prompt, add_special_tokens: bool = True,
                       field_name: str = "prompt", truncate: int | None = None) -> list[int]:
        """Text -> ids on the tokenizer pool (ids pass through; the engine checks their range).
        ``truncate`` (``truncate_prompt_tokens``): keep the last k ids (-1: max_model_len - 1);
        a text over the character cap is then tokenized anyway (the body limit bounds it)."""
        if isinstance(prompt, list):
            return self.truncate(prompt, truncate)
        self._need_tokenizer("a text prompt")
        if not prompt:
            raise bad_request(f"'{field_name}' must not be empty", field_name)
        if truncate is None:
            self._check_chars(len(prompt), field_name)
        ids = await self._off_loop(self.tokenizer.encode, prompt, add_special_tokens)
        return self.truncate(ids, truncate)

    def truncate(self, ids: list[int], keep: int | None) -> list[int]:
        """The last ``keep`` ids (None: all; -1: as many as leave one token for the output)."""
        if keep is None:
            return ids
        return ids[-(self.max_model_len - 1 if keep == -1 else keep):]

    async def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                          tools: list[dict[str, Any]] | None = None,
                          template_kwargs: dict[str, Any] | None = None,
                          continue_final_message: bool = False) -> list[int]:
        """Messages -> chat template -> ids (no second BOS: the template has it, as in LLM.chat);
        rendering and encoding run on the tokenizer pool."""
        self._need_tokenizer("chat")
        self._check_chars(_text_chars(messages) + _text_chars(tools) + _text_chars(template_kwargs),
                          "messages")
        return await self._off_loop(self._render_chat, messages, add_generation_prompt, tools,
                                    template_kwargs, continue_final_message)

    def _render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool,
                     tools: list[dict[str, Any]] | None, template_kwargs: dict[str, Any] | None,
                     continue_final_message: bool) -> list[int]:
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt, tools,
                                                      template_kwargs=template_kwargs,
                                                      continue_final_message=continue_final_message)
        except ValueError as e:
            where = "continue_final_message" if "continue_final_message" in str(e) else "messages"
            raise bad_request(str(e), where) from e
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

    def check_sequences(self, n: int, num_prompts: int) -> None:
        """400 when one request holds more sequences than the engine could ever queue: each
        prompt's ``n`` sequences enter the waiting queue together (at most ``max_waiting``), and
        all of a request's sequences must fit the queue plus the running batch. Past that a
        429 would be a lie: no retry could succeed."""
        if n > MAX_N:
            raise bad_request(f"'n' must be <= {MAX_N}, got {n}", "n")
        if n > self.max_waiting:
            raise bad_request(f"'n' = {n} sequences can never be queued: this server's waiting queue "
                              f"holds {self.max_waiting} (--max-waiting)", "n")
        total = n * num_prompts
        if total > self.max_waiting + self.max_num_seqs:
            where = "n" if n > 1 else "prompt"
            raise bad_request(f"this request has {total} sequences ({num_prompts} prompts x n = {n}); "
                              f"this server holds at most {self.max_waiting + self.max_num_seqs} "
                              f"(--max-waiting {self.max_waiting} + --max-num-seqs "
                              f"{self.max_num_seqs}); split the request", where)

    def make_params(self, sampling: dict[str, Any], max_tokens: int | None, logprobs: int | None,
                    prompt_len: int, prompt_field: str = "prompt",
                    names: Mapping[str, str] | None = None,
                    prompt_logprobs: int | None = None) -> SamplingParams:
        """SamplingParams with ``max_tokens`` checked against (or defaulted to) what fits.
        ``names`` maps SamplingParams fields to what the client called them (chat's
        ``max_completion_tokens``, ``top_logprobs``), so every error names the client's field."""
        names = dict(names or {})
        n = sampling.get("n", 1)
        if isinstance(n, int) and n > MAX_N:
            raise bad_request(f"'n' must be <= {MAX_N}, got {n}", "n")
        limit = self.max_model_len
        if prompt_len >= limit:
            raise bad_request(f"this model's maximum context length is {limit} tokens, but the "
                              f"{prompt_field} has {prompt_len} tokens (at least one token must be "
                              "left for the completion)", prompt_field)
        max_name = names.get("max_tokens", "max_tokens")
        if max_tokens is None:
            max_tokens = limit - prompt_len
        elif max_tokens >= 1 and prompt_len + max_tokens > limit:
            raise bad_request(f"this model's maximum context length is {limit} tokens; you requested "
                              f"{prompt_len + max_tokens} tokens ({prompt_len} in the {prompt_field}, "
                              f"{max_tokens} in the completion); reduce {max_name} or the "
                              f"{prompt_field}", max_name)
        try:
            return SamplingParams(**sampling, max_tokens=max_tokens, logprobs=logprobs,
                                  prompt_logprobs=prompt_logprobs)
        except (ValueError, TypeError) as e:
            name, message = rename_fields(str(e), names)
            raise bad_request(message, name) from e

    async def start(self, prompt_ids: list[int], params: SamplingParams, request_id: str,
                    cache_salt: str | None = None, priority: int = 0,
                    names: Mapping[str, str] | None = None) -> RequestStream:
        """Queue the request; engine errors become APIErrors (400 / 429 / 503), a 400's param
        renamed to the client's field through ``names`` (``response_format`` for a schema)."""
        try:
            if params.structured_outputs is not None:   # compile on the pool, not the engine thread
                await self._off_loop(self.engine.compile_grammar, params)
            return await self.engine.add_request(prompt_ids, params, request_id, cache_salt,
                                                 priority=priority)
        except Exception as e:
            err = from_exception(e)
            if names and err.param in names:
                err.param = names[err.param]
            raise err from e


def _longest_token_chars(tokenizer: Any) -> int:
    """Characters of the longest vocabulary entry (a byte-level entry spells one byte per
    character, so its decoded text is never longer); 1 without a tokenizer."""
    if tokenizer is None:
        return 1
    longest = 1
    for i in range(tokenizer.vocab_size):
        token = tokenizer.id_to_token(i)
        if token is not None and len(token) > longest:
            longest = len(token)
    return longest


def _text_chars(value: Any) -> int:
    """Characters in all the strings (keys too) of a JSON-like value (chat messages, tools)."""
    total, stack = 0, [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            total += len(v)
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return total
