"""OpenAI response shapes: completion / chat choices, stream chunks, logprobs, usage.

Where it sits: the last hop of the HTTP path; server/http_app.py turns ``CompletionDelta``s
(jserve/async_engine.py) and final ``RequestOutput``s into these JSON objects. Pure functions,
no I/O.

``usage.prompt_tokens_details`` carries ``cached_tokens`` only when the engine reports prompt
tokens served from a prefix cache (``RequestOutput.num_cached_tokens`` > 0); otherwise it is null.
"""

from __future__ import annotations

import time
from typing import Any

from jserve.outputs import Logprob
from server.serving import Serving

SampleLogprobs = list[dict[int, Logprob]]


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens} if cached_tokens else None}


def _sorted_top(entry: dict[int, Logprob], limit: int | None) -> list[tuple[int, Logprob]]:
    """The top-N alternatives of one position, most likely first (the sampled token only if ranked)."""
    ranked = sorted(((t, lp) for t, lp in entry.items() if lp.rank is not None), key=lambda x: x[1].rank)
    return ranked if limit is None else ranked[:limit]


def completion_logprobs(token_ids: list[int], logprobs: SampleLogprobs, text_offset: int,
                        num_top: int) -> tuple[dict[str, Any], int]:
    """Legacy completions logprobs for new tokens; returns it and the next text offset."""
    tokens, token_lps, tops, offsets = [], [], [], []
    for tid, entry in zip(token_ids, logprobs, strict=True):
        sampled = entry[tid]
        name = Serving.token_text(tid, sampled)
        tokens.append(name)
        token_lps.append(sampled.logprob)
        top = {Serving.token_text(t, lp): lp.logprob for t, lp in _sorted_top(entry, num_top)}
        top.setdefault(name, sampled.logprob)
        tops.append(top)
        offsets.append(text_offset)
        text_offset += len(name)
    return ({"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops,
             "text_offset": offsets}, text_offset)


def echo_logprobs(prompt_ids: list[int], prompt_lps: list[dict[int, Logprob] | None],
                  num_top: int) -> tuple[dict[str, Any], int]:
    """Legacy completions logprobs of an echoed prompt (vLLM: the first token's logprob and top
    are null); returns it and the text offset after it."""
    tokens, token_lps, tops, offsets, offset = [], [], [], [], 0
    for tid, entry in zip(prompt_ids, prompt_lps, strict=True):
        if entry is None:
            name = str(tid)
            token_lps.append(None)
            tops.append(None)
        else:
            name = Serving.token_text(tid, entry[tid])
            token_lps.append(entry[tid].logprob)
            top = {Serving.token_text(t, lp): lp.logprob for t, lp in _sorted_top(entry, num_top)}
            top.setdefault(name, entry[tid].logprob)
            tops.append(top)
        tokens.append(name)
        offsets.append(offset)
        offset += len(name)
    return ({"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops,
             "text_offset": offsets}, offset)


def join_logprobs(first: dict[str, Any], second: dict[str, Any] | None) -> dict[str, Any]:
    """Two legacy completions logprobs objects, one after the other."""
    if second is None:
        return first
    return {k: first[k] + second[k] for k in first}


def prompt_logprobs(prompt_ids: list[int], entries: list[dict[int, Logprob] | None] | None,
                    num_top: int) -> list[dict[str, Any] | None] | None:
    """vLLM's ``prompt_logprobs`` JSON: per prompt token null (the first) or {token id: {logprob,
    rank, decoded_token}} with the prompt token and its ``num_top`` most likely alternatives."""
    if entries is None:
        return None
    out: list[dict[str, Any] | None] = []
    for tid, entry in zip(prompt_ids, entries, strict=True):
        if entry is None:
            out.append(None)
            continue
        out.append({str(t): {"logprob": lp.logprob, "rank": lp.rank, "decoded_token": lp.decoded_token}
                    for t, lp in entry.items() if t == tid or (lp.rank is not None and lp.rank <= num_top)})
    return out


# Fields of a streamed choice that vLLM (and OpenAI) send even when null.
_KEEP_NULL = frozenset({"finish_reason", "logprobs"})


def drop_nulls(chunk: dict[str, Any]) -> dict[str, Any]:
    """A stream chunk as vLLM sends it: null fields left out (``usage`` until it is set,
    ``stop_reason``, ``prompt_tokens_details``), except a choice's ``finish_reason`` and
    ``logprobs``."""
    out = {k: v for k, v in chunk.items() if v is not None}
    if out.get("usage"):
        out["usage"] = {k: v for k, v in out["usage"].items() if v is not None}
    out["choices"] = [{k: v for k, v in c.items() if v is not None or k in _KEEP_NULL}
                      for c in chunk.get("choices", [])]
    return out


def _chat_token(tid: int, lp: Logprob) -> dict[str, Any]:
    name = Serving.token_text(tid, lp)
    return {"token": name, "logprob": lp.logprob, "bytes": list(name.encode("utf-8"))}


def chat_logprobs(token_ids: list[int], logprobs: SampleLogprobs, num_top: int) -> dict[str, Any]:
    content = []
    for tid, entry in zip(token_ids, logprobs, strict=True):
        item = _chat_token(tid, entry[tid])
        item["top_logprobs"] = [_chat_token(t, lp) for t, lp in _sorted_top(entry, num_top)]
        content.append(item)
    return {"content": content}


def completion_choice(index: int, text: str, finish_reason: str | None, stop_reason: Any,
                      logprobs: dict[str, Any] | None, token_ids: list[int] | None) -> dict[str, Any]:
    choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason,
              "stop_reason": stop_reason}
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return choice


def chat_choice(index: int, text: str, finish_reason: str | None, stop_reason: Any,
                logprobs: dict[str, Any] | None, token_ids: list[int] | None,
                message: dict[str, Any] | None = None) -> dict[str, Any]:
    """``message``: the assistant message when it is not plain ``text`` (tool calls)."""
    choice = {"index": index, "message": message or {"role": "assistant", "content": text},
              "logprobs": logprobs, "finish_reason": finish_reason, "stop_reason": stop_reason}
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return choice


def chat_delta_choice(index: int, delta: dict[str, Any], finish_reason: str | None,
                      stop_reason: Any, logprobs: dict[str, Any] | None,
                      token_ids: list[int] | None) -> dict[str, Any]:
    choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason,
              "stop_reason": stop_reason}
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return choice


def envelope(object_type: str, rid: str, model: str, created: int, choices: list[dict[str, Any]],
             usage_: dict[str, Any] | None, **extra: Any) -> dict[str, Any]:
    body = {"id": rid, "object": object_type, "created": created, "model": model, "choices": choices,
            "usage": usage_}
    body.update(extra)
    return body


def now() -> int:
    return int(time.time())
