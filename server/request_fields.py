"""Which top-level request fields each endpoint honours, accepts without effect, or refuses.

Where it sits: server/protocol.py calls ``check_fields`` on every body before reading a single
field, so that nothing a client asks for is silently ignored (DESIGN invariant 7)::

    field in HONOURED[endpoint]        read by server/protocol.py and acted on
    field in NO_SEMANTICS              OpenAI fields with no effect on generation
                                       (user, metadata, store, service_tier, parallel_tool_calls)
    field in NOT_SUPPORTED             400 naming the field and saying why, unless its value asks
                                       for nothing (null, false, empty, {"type": "text"})
    anything else                      400 "unknown field" naming it (OpenAI's behaviour), with
                                       the closest known name as a hint

Structured outputs (``response_format``, ``guided_json/regex/choice/grammar``,
``structured_outputs``), ``logit_bias``, ``allowed_token_ids`` and ``bad_words`` are honoured
(server/structured_request.py); tool calling on chat (server/tool_calls.py).
"""

from __future__ import annotations

import difflib
from typing import Any

from server.errors import bad_request

COMPLETIONS, CHAT, TOKENIZE, DETOKENIZE = "completions", "chat", "tokenize", "detokenize"

# Sampling and stopping fields both generation endpoints honour (vLLM's names).
_SAMPLING = frozenset({
    "n", "best_of", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
    "presence_penalty", "frequency_penalty", "seed", "min_tokens", "max_tokens", "stop",
    "stop_token_ids", "ignore_eos", "skip_special_tokens", "include_stop_str_in_output",
    # token masks and biases (server/structured_request.py)
    "response_format", "structured_outputs", "guided_json", "guided_regex", "guided_choice",
    "guided_grammar", "logit_bias", "allowed_token_ids", "bad_words",
})
_COMMON = frozenset({"model", "stream", "stream_options", "logprobs", "return_token_ids",
                     "cache_salt", "priority", "prompt_logprobs", "truncate_prompt_tokens"})

HONOURED: dict[str, frozenset[str]] = {
    COMPLETIONS: _SAMPLING | _COMMON | {"prompt", "echo"},
    CHAT: _SAMPLING | _COMMON | {"messages", "max_completion_tokens", "top_logprobs",
                                 "add_generation_prompt", "continue_final_message",
                                 "chat_template_kwargs", "tools", "tool_choice"},
    TOKENIZE: frozenset({"model", "prompt", "messages", "add_special_tokens",
                         "add_generation_prompt", "return_token_strs"}),
    DETOKENIZE: frozenset({"model", "tokens"}),
}

NO_SEMANTICS = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls"})

NOT_SUPPORTED: dict[str, str] = {
    "guided_decoding_backend": "the grammar engine is fixed (llguidance); leave it out",
    "guided_whitespace_pattern": "a custom JSON whitespace pattern is not supported",
    "use_beam_search": "beam search is not supported",
    "length_penalty": "length_penalty (beam search) is not supported",
    "suffix": "suffix (fill-in-the-middle) is not supported",
    "functions": "function calling is not supported",
    "function_call": "function calling is not supported",
}


def _asks_for_nothing(name: str, value: Any) -> bool:
    """A value that requests no behaviour: null, false or empty."""
    return value is None or value is False or value == "" or value == [] or value == {}


def check_fields(d: dict[str, Any], endpoint: str) -> None:
    """400 naming the first field of ``d`` that ``endpoint`` would not act on."""
    honoured = HONOURED[endpoint]
    generation = endpoint in (COMPLETIONS, CHAT)
    for name, value in d.items():
        if name in honoured:
            continue
        if generation and name in NO_SEMANTICS:
            continue
        if name in NOT_SUPPORTED and generation:
            if _asks_for_nothing(name, value):
                continue
            raise bad_request(f"'{name}': {NOT_SUPPORTED[name]}", name)
        known = sorted(honoured | (NO_SEMANTICS if generation else frozenset()))
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise bad_request(f"unknown field '{name}' for /{_PATHS[endpoint]}{hint}", name)


_PATHS = {COMPLETIONS: "v1/completions", CHAT: "v1/chat/completions", TOKENIZE: "tokenize",
          DETOKENIZE: "detokenize"}
