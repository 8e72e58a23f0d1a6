"""OpenAI completions and chat completions over the async engine (full and streamed).

Where it sits: called by server/http_app.py with a parsed request (server/protocol.py); uses
server/serving.py to tokenize, check limits and start engine requests, then turns the
cumulative ``RequestOutput``s into OpenAI JSON (server/openai_format.py)::

    CompletionRequest --start()--> one engine request per prompt (each with n sequences)
        full():   wait for the last output of each -> one response object
        stream(): merge the streams -> one chunk per sequence delta
                  [-> usage chunk if stream_options.include_usage]   (http_app adds [DONE])

Choice indices: prompt ``i``, sequence ``j`` -> ``i * n + j`` (as vLLM and OpenAI). Every stream is
aborted when the handler exits early (error, client gone), which frees its KV pages.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from jserve.async_engine import DeltaTracker, RequestStream
from jserve.outputs import RequestOutput
from server import openai_format as fmt
from server.access_log import TokenCount
from server.errors import from_exception
from server.protocol import ChatRequest, CompletionRequest, Prompt
from server.serving import Serving, new_id
from server.tool_calls import (
    AUTO,
    NAMED,
    NONE,
    ToolSpec,
    call_json,
    forced_calls,
    new_call_id,
    parse_tools,
    shape_message,
)
from server.tool_parsers import StreamingToolText, get_tool_parser


@dataclass
class Started:
    """Engine requests of one API request, in prompt order."""

    rid: str
    model: str
    created: int
    streams: list[RequestStream]
    prompt_ids: list[list[int]]
    echo_texts: list[str] = field(default_factory=list)
    tokens: TokenCount = field(default_factory=TokenCount)   # for the access log line
    tools: ToolSpec | None = None   # chat: the request's tools and tool_choice

    def abort(self) -> None:
        for s in self.streams:
            s.abort()

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompt_ids)


async def _start_all(serving: Serving, prefix: str, model: str, prompts: list[list[int]],
                     params_list: list[Any], cache_salt: str | None = None, priority: int = 0,
                     names: dict[str, str] | None = None) -> Started:
    started = Started(new_id(prefix), model, fmt.now(), [], prompts)
    started.tokens.prompt = started.prompt_tokens
    try:
        for i, (ids, params) in enumerate(zip(prompts, params_list, strict=True)):
            started.streams.append(await serving.start(ids, params, f"{started.rid}-{i}", cache_salt,
                                                       priority, names))
    except BaseException:
        started.abort()
        raise
    return started


async def _final(stream: RequestStream) -> RequestOutput:
    last = None
    async for out in stream:
        last = out
    if last is None:
        raise RuntimeError(f"request {stream.request_id} ended without output")
    return last


async def _gather_finals(started: Started) -> list[RequestOutput]:
    try:
        return list(await asyncio.gather(*(_final(s) for s in started.streams)))
    except BaseException as e:
        started.abort()
        if isinstance(e, Exception):
            raise from_exception(e) from e
        raise


async def _merged(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, output) from all streams as they come."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    q: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, s: RequestStream) -> None:
        try:
            async for out in s:
                q.put_nowait((i, out))
        except Exception as e:
            q.put_nowait((i, e))
        q.put_nowait((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await q.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


def _cached(outs: list[RequestOutput | None]) -> int:
    return sum(o.num_cached_tokens for o in outs if o is not None)


# -------------------------------------------------------------------------- completions
class CompletionHandler:
    def __init__(self, serving: Serving) -> None:
        self.serving = serving

    def _echo_text(self, prompt: Prompt, ids: list[int], truncated: bool) -> str:
        if isinstance(prompt, str) and not truncated:
            return prompt
        return self.serving.tokenizer.decode(ids, skip_special_tokens=False) if self.serving.tokenizer else ""

    @staticmethod
    def _prompt_top(req: CompletionRequest) -> int | None:
        """Top-N the engine scores prompt tokens with: prompt_logprobs, and echo's logprobs."""
        wants = [n for n in (req.prompt_logprobs, req.logprobs if req.echo else None) if n is not None]
        return max(wants) if wants else None

    async def start(self, req: CompletionRequest) -> Started:
        model = self.serving.check_model(req.model)
        self.serving.check_sequences(req.sampling["n"], len(req.prompts))
        ids_list, params_list = [], []
        for i, prompt in enumerate(req.prompts):
            field_name = "prompt" if len(req.prompts) == 1 else f"prompt[{i}]"
            ids = await self.serving.tokenize(prompt, field_name=field_name,
                                              truncate=req.truncate_prompt_tokens)
            params_list.append(self.serving.make_params(req.sampling, req.max_tokens, req.logprobs,
                                                        len(ids), field_name, req.field_names,
                                                        self._prompt_top(req)))
            ids_list.append(ids)
        started = await _start_all(self.serving, "cmpl", model, ids_list, params_list, req.cache_salt,
                                   req.priority, req.field_names)
        if req.echo:
            truncated = req.truncate_prompt_tokens is not None
            started.echo_texts = [self._echo_text(p, ids, truncated)
                                  for p, ids in zip(req.prompts, ids_list, strict=True)]
        return started

    def _logprobs(self, req: CompletionRequest, token_ids: list[int], lps: Any,
                  offset: int) -> tuple[dict[str, Any] | None, int]:
        if req.logprobs is None or lps is None:
            return None, offset
        return fmt.completion_logprobs(token_ids, lps, offset, req.logprobs)

    @staticmethod
    def _echo_logprobs(req: CompletionRequest, out: RequestOutput) -> dict[str, Any] | None:
        """The echoed prompt's part of the choice's logprobs (echo with logprobs)."""
        if not req.echo or req.logprobs is None or out.prompt_logprobs is None:
            return None
        return fmt.echo_logprobs(out.prompt_token_ids, out.prompt_logprobs, req.logprobs)[0]

    @staticmethod
    def _prompt_logprobs(req: CompletionRequest, out: RequestOutput) -> dict[str, Any]:
        if req.prompt_logprobs is None:
            return {}
        return {"prompt_logprobs": fmt.prompt_logprobs(out.prompt_token_ids, out.prompt_logprobs,
                                                       req.prompt_logprobs)}

    async def full(self, req: CompletionRequest, started: Started) -> dict[str, Any]:
        outs = await _gather_finals(started)
        n = req.sampling["n"]
        choices, completion_tokens = [], 0
        for p_idx, out in enumerate(outs):
            echo = started.echo_texts[p_idx] if req.echo else ""
            echo_lps = self._echo_logprobs(req, out)
            for comp in out.outputs:
                completion_tokens += len(comp.token_ids)
                lps, _ = self._logprobs(req, comp.token_ids, comp.logprobs, len(echo))
                if echo_lps is not None:
                    lps = fmt.join_logprobs(echo_lps, lps)
                choice = fmt.completion_choice(
                    p_idx * n + comp.index, echo + comp.text, comp.finish_reason, comp.stop_reason, lps,
                    comp.token_ids if req.return_token_ids else None)
                choice.update(self._prompt_logprobs(req, out))
                choices.append(choice)
        started.tokens.completion = completion_tokens
        extra = {"prompt_token_ids": started.prompt_ids} if req.return_token_ids else {}
        return fmt.envelope("text_completion", started.rid, started.model, started.created, choices,
                            fmt.usage(started.prompt_tokens, completion_tokens, _cached(outs)), **extra)

    async def stream(self, req: CompletionRequest, started: Started) -> AsyncIterator[dict[str, Any]]:
        n = req.sampling["n"]
        trackers = [DeltaTracker() for _ in started.streams]
        offsets: dict[int, int] = {}
        echoed: set[int] = set()
        completion_tokens = 0
        last: list[RequestOutput | None] = [None] * len(started.streams)
        try:
            async for p_idx, out in _merged(started.streams):
                last[p_idx] = out
                for d in trackers[p_idx].update(out):
                    index = p_idx * n + d.index
                    text, echo_lps = d.text, None
                    if req.echo and index not in echoed:
                        echoed.add(index)
                        text = started.echo_texts[p_idx] + text
                        offsets[index] = len(started.echo_texts[p_idx])
                        echo_lps = self._echo_logprobs(req, out)
                    completion_tokens += len(d.token_ids)
                    started.tokens.completion = completion_tokens
                    lps, offsets[index] = self._logprobs(req, d.token_ids, d.logprobs,
                                                         offsets.get(index, 0))
                    if echo_lps is not None:
                        lps = fmt.join_logprobs(echo_lps, lps)
                    choice = fmt.completion_choice(index, text, d.finish_reason, d.stop_reason, lps,
                                                   d.token_ids if req.return_token_ids else None)
                    use = (fmt.usage(started.prompt_tokens, completion_tokens)
                           if req.continuous_usage else None)
                    yield fmt.drop_nulls(fmt.envelope("text_completion", started.rid, started.model,
                                                      started.created, [choice], use))
            if req.include_usage:
                yield fmt.drop_nulls(fmt.envelope(
                    "text_completion", started.rid, started.model, started.created, [],
                    fmt.usage(started.prompt_tokens, completion_tokens, _cached(last))))
        finally:
            started.abort()


# -------------------------------------------------------------------------- chat
class ChatHandler:
    def __init__(self, serving: Serving) -> None:
        self.serving = serving

    async def start(self, req: ChatRequest) -> Started:
        model = self.serving.check_model(req.model)
        self.serving.check_sequences(req.sampling["n"], 1)
        spec = parse_tools({"tools": req.tools, "tool_choice": req.tool_choice},
                           self.serving.tool_call_parser)
        ids = await self.serving.render_chat(req.messages, req.add_generation_prompt, req.tools,
                                             req.template_kwargs, req.continue_final_message)
        ids = self.serving.truncate(ids, req.truncate_prompt_tokens)
        top = req.top_logprobs if req.logprobs else None
        sampling, names = req.sampling, req.field_names
        forced = spec.structured_outputs() if spec is not None else None
        if forced is not None:
            sampling = {**sampling, "structured_outputs": forced}
            names = {**names, "structured_outputs": "tools"}
        params = self.serving.make_params(sampling, req.max_tokens, top, len(ids), "messages", names,
                                          req.prompt_logprobs)
        started = await _start_all(self.serving, "chatcmpl", model, [ids], [params], req.cache_salt,
                                   req.priority, names)
        started.tools = spec
        return started

    def _parser(self, started: Started):
        spec = started.tools
        if spec is None or spec.mode != AUTO:
            return None
        return get_tool_parser(self.serving.tool_call_parser)

    @staticmethod
    def _logprobs(req: ChatRequest, token_ids: list[int], lps: Any) -> dict[str, Any] | None:
        if not req.logprobs or lps is None:
            return None
        return fmt.chat_logprobs(token_ids, lps, req.top_logprobs)

    async def full(self, req: ChatRequest, started: Started) -> dict[str, Any]:
        (out,) = await _gather_finals(started)
        parser = self._parser(started)
        choices = []
        for c in out.outputs:
            message, finish = shape_message(started.tools, parser, c.text, c.finish_reason)
            choices.append(fmt.chat_choice(c.index, c.text, finish, c.stop_reason,
                                           self._logprobs(req, c.token_ids, c.logprobs),
                                           c.token_ids if req.return_token_ids else None, message))
        completion_tokens = sum(len(c.token_ids) for c in out.outputs)
        started.tokens.completion = completion_tokens
        extra = {"prompt_token_ids": started.prompt_ids[0]} if req.return_token_ids else {}
        if req.prompt_logprobs is not None:
            extra["prompt_logprobs"] = fmt.prompt_logprobs(out.prompt_token_ids, out.prompt_logprobs,
                                                           req.prompt_logprobs)
        return fmt.envelope("chat.completion", started.rid, started.model, started.created, choices,
                            fmt.usage(started.prompt_tokens, completion_tokens, out.num_cached_tokens),
                            **extra)

    async def stream(self, req: ChatRequest, started: Started) -> AsyncIterator[dict[str, Any]]:
        def chunk(choices: list[dict[str, Any]], use: dict[str, Any] | None = None) -> dict[str, Any]:
            return fmt.drop_nulls(fmt.envelope("chat.completion.chunk", started.rid, started.model,
                                               started.created, choices, use))

        tracker, completion_tokens, last = DeltaTracker(), 0, None
        tools = _StreamedTools(started.tools, self._parser(started), req.sampling["n"])
        try:
            for i in range(req.sampling["n"]):
                yield chunk([fmt.chat_delta_choice(i, {"role": "assistant", "content": ""}, None, None,
                                                   None, None)])
            async for _, out in _merged(started.streams):
                last = out
                for d in tracker.update(out):
                    completion_tokens += len(d.token_ids)
                    started.tokens.completion = completion_tokens
                    delta, finish = tools.delta(d.index, d.text, d.finish_reason)
                    choice = fmt.chat_delta_choice(
                        d.index, delta, finish, d.stop_reason,
                        self._logprobs(req, d.token_ids, d.logprobs),
                        d.token_ids if req.return_token_ids else None)
                    use = (fmt.usage(started.prompt_tokens, completion_tokens)
                           if req.continuous_usage else None)
                    yield chunk([choice], use)
            if req.include_usage:
                yield chunk([], fmt.usage(started.prompt_tokens, completion_tokens, _cached([last])))
        finally:
            started.abort()


class _StreamedTools:
    """Per choice: turns text deltas into OpenAI chat deltas under the request's tool_choice.

    none / no tools: ``content``. named: the function's arguments stream as
    ``tool_calls[0].function.arguments`` deltas (the first carries id and name). required: the
    forced JSON array is held and sent as tool-call deltas when the sequence ends. auto: content
    until the parser sees a call may start (server/tool_parsers/), the calls at the end."""

    def __init__(self, spec: ToolSpec | None, parser: Any, n: int) -> None:
        self.spec = spec
        self.mode = NONE if spec is None else spec.mode
        self.text = [""] * n
        self.started = [False] * n
        self.auto = [StreamingToolText(parser) for _ in range(n)] if self.mode == AUTO else None

    def delta(self, i: int, text: str, finish: str | None) -> tuple[dict[str, Any], str | None]:
        if self.mode == NONE:
            return {"content": text}, finish
        if self.mode == NAMED:
            if not self.started[i]:
                self.started[i] = True
                call = {"index": 0, "id": new_call_id(), "type": "function",
                        "function": {"name": self.spec.name, "arguments": text}}
            else:
                call = {"index": 0, "function": {"arguments": text}}
            return {"tool_calls": [call]}, finish
        self.text[i] += text
        content, calls = "", []
        if self.mode == AUTO:
            content = self.auto[i].feed(text)
            if finish is not None:
                rest, calls = self.auto[i].finish()
                content += rest
        elif finish is not None:  # REQUIRED
            calls = forced_calls(self.spec, self.text[i])
            if not calls:
                content = self.text[i]
        delta: dict[str, Any] = {}
        if content:
            delta["content"] = content
        if calls:
            delta["tool_calls"] = [call_json(k, c) for k, c in enumerate(calls)]
            if finish == "stop":
                finish = "tool_calls"
        return delta, finish
