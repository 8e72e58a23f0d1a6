"""OpenAI request bodies -> typed, validated requests (completions, chat, tokenize).

Where it sits: the first hop of the HTTP path: ``http_app`` decodes the body
(server/json_body.py: depth, lone surrogates, huge numbers), then one of the ``parse_*``
functions here checks which fields are present (server/request_fields.py: unknown or
unsupported fields are a 400 naming them), checks every field's type and range, and turns the
body into a frozen request (sampling fields still as a dict: ``max_tokens`` is resolved by
server/serving.py once the prompt length is known). Every error is ``APIError(400)`` with
``param`` set to the field as the client spelled it (``max_completion_tokens``,
``messages[1].role``, ``stop``).

Sampling fields: the OpenAI ones (temperature, top_p, n, stop, seed, presence/frequency
penalty, max_tokens, logprobs) plus vLLM's extras (top_k, min_p, repetition_penalty,
ignore_eos, stop_token_ids, min_tokens, skip_special_tokens, include_stop_str_in_output,
``priority``: lower is admitted first, default 0, ``prompt_logprobs``, ``truncate_prompt_tokens``:
keep the prompt's last k tokens) and ``return_token_ids`` (choices carry the generated token
ids; a streaming client can count tokens exactly without a tokenizer). Chat adds
``continue_final_message`` (the prompt ends inside the last assistant message) and
``chat_template_kwargs``. ``max_tokens: null`` means the rest of the context on both endpoints
(an absent one is OpenAI's 16 on completions).

Per-request limits (a request over one is a 400 naming the field):

    stop              at most MAX_STOP_STRINGS (64) strings, MAX_STOP_CHARS (4096) characters in all
    stop_token_ids    at most MAX_STOP_TOKEN_IDS (256) ids
    priority          an integer in [-2**31, 2**31)
    n                 1..128 (jserve.sampling_params.MAX_N); n > 1 needs temperature > 0
    messages[i].role  one of CHAT_ROLES
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from jserve.sampling_params import MAX_LOGPROBS
from server.errors import bad_request
from server.request_fields import CHAT, COMPLETIONS, check_fields
from server.structured_request import mask_fields, structured_spec
from server.tool_calls import parse_tools

Prompt = str | list[int]

MAX_STOP_STRINGS = 64
MAX_STOP_CHARS = 4096
MAX_STOP_TOKEN_IDS = 256
PRIORITY_RANGE = (-2**31, 2**31 - 1)
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")

_NUMBER_FIELDS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                  "frequency_penalty")
_INT_FIELDS = ("top_k", "seed", "min_tokens")
_BOOL_FIELDS = ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output")
_GREEDY_EPS = 1e-5


# ---------------------------------------------------------------------------- field readers
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def get_int(d: dict, name: str, default: int | None = None) -> int | None:
    v = d.get(name)
    if v is None:
        return default
    if not _is_int(v):
        raise bad_request(f"'{name}' must be an integer, got {type(v).__name__}", name)
    return v


def get_number(d: dict, name: str, default: float | None = None) -> float | None:
    v = d.get(name)
    if v is None:
        return default
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise bad_request(f"'{name}' must be a number, got {type(v).__name__}", name)
    return float(v)


def get_bool(d: dict, name: str, default: bool) -> bool:
    v = d.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad_request(f"'{name}' must be a boolean, got {type(v).__name__}", name)
    return v


def get_str(d: dict, name: str, default: str | None = None) -> str | None:
    v = d.get(name)
    if v is None:
        return default
    if not isinstance(v, str):
        raise bad_request(f"'{name}' must be a string, got {type(v).__name__}", name)
    return v


def get_int_list(d: dict, name: str) -> list[int]:
    v = d.get(name)
    if v is None:
        return []
    if not isinstance(v, list) or not all(_is_int(t) for t in v):
        raise bad_request(f"'{name}' must be a list of integers", name)
    return v


def get_stop(d: dict) -> list[str]:
    v = d.get("stop")
    if v is None:
        return []
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise bad_request("'stop' must be a string or a list of strings", "stop")
    if len(v) > MAX_STOP_STRINGS:
        raise bad_request(f"'stop' has {len(v)} strings; at most {MAX_STOP_STRINGS} are allowed", "stop")
    if any(not s for s in v):
        raise bad_request("'stop' strings must not be empty", "stop")
    total = sum(len(s) for s in v)
    if total > MAX_STOP_CHARS:
        raise bad_request(f"'stop' strings have {total} characters in all; at most {MAX_STOP_CHARS} "
                          "are allowed", "stop")
    return v


def get_stop_token_ids(d: dict) -> list[int]:
    ids = get_int_list(d, "stop_token_ids")
    if len(ids) > MAX_STOP_TOKEN_IDS:
        raise bad_request(f"'stop_token_ids' has {len(ids)} ids; at most {MAX_STOP_TOKEN_IDS} are "
                          "allowed", "stop_token_ids")
    if any(t < 0 for t in ids):
        raise bad_request("'stop_token_ids' must be token ids >= 0", "stop_token_ids")
    return ids


def _sampling_fields(d: dict) -> dict[str, Any]:
    """The SamplingParams keywords present in the body (max_tokens and logprobs excluded)."""
    out: dict[str, Any] = {}
    for name in _NUMBER_FIELDS:
        v = get_number(d, name)
        if v is not None:
            out[name] = v
    for name in _INT_FIELDS:
        v = get_int(d, name)
        if v is not None:
            out[name] = v
    for name in _BOOL_FIELDS:
        if d.get(name) is not None:
            out[name] = get_bool(d, name, False)
    n = get_int(d, "n", 1)
    if n < 1:
        raise bad_request(f"'n' must be >= 1, got {n}", "n")
    out["n"] = n
    check_n_greedy(n, out.get("temperature", 1.0))
    out["stop"] = get_stop(d)
    out["stop_token_ids"] = get_stop_token_ids(d)
    best_of = get_int(d, "best_of")
    if best_of is not None and best_of != n:
        raise bad_request("'best_of' is not supported (it must equal n)", "best_of")
    masks, _ = mask_fields(d)
    out.update(masks)
    return out


def check_n_greedy(n: int, temperature: float) -> None:
    """n > 1 with greedy sampling is a 400 (as in vLLM): the sequences would all be the same."""
    if n > 1 and temperature < _GREEDY_EPS:
        raise bad_request(f"'n' must be 1 with greedy sampling (temperature 0): the {n} sequences "
                          "would be identical; set temperature > 0", "n")


def _max_tokens(d: dict, *names: str, default: int | None = None) -> tuple[int | None, str]:
    """(value, the field it came from) from the first of ``names`` the body sets."""
    for name in names:
        v = get_int(d, name)
        if v is not None:
            if v < 1:
                raise bad_request(f"'{name}' must be >= 1, got {v}", name)
            return v, name
    return default, names[0]


def _priority(d: dict) -> int:
    p = get_int(d, "priority", 0)
    lo, hi = PRIORITY_RANGE
    if not lo <= p <= hi:
        raise bad_request(f"'priority' must be in [{lo}, {hi}], got {p}", "priority")
    return p


def _stream_options(d: dict, stream: bool) -> tuple[bool, bool]:
    """(include_usage, continuous_usage_stats) from ``stream_options``."""
    opts = d.get("stream_options")
    if opts is None:
        return False, False
    if not stream:
        raise bad_request("'stream_options' is only allowed with stream=true", "stream_options")
    if not isinstance(opts, dict):
        raise bad_request("'stream_options' must be an object", "stream_options")
    for key in opts:
        if key not in ("include_usage", "continuous_usage_stats", "include_obfuscation"):
            raise bad_request(f"unknown field 'stream_options.{key}'", f"stream_options.{key}")
    return (get_bool(opts, "include_usage", False), get_bool(opts, "continuous_usage_stats", False))


def _prompt_logprobs(d: dict) -> int | None:
    v = get_int(d, "prompt_logprobs")
    if v is not None and not 0 <= v <= MAX_LOGPROBS:
        raise bad_request(f"'prompt_logprobs' must be in [0, {MAX_LOGPROBS}], got {v}", "prompt_logprobs")
    return v


def _check_not_streamed(d: dict, stream: bool) -> None:
    """vLLM's rule: prompt logprobs are not available when streaming."""
    if stream and d.get("prompt_logprobs") is not None:
        raise bad_request("'prompt_logprobs' is not available with stream=true", "prompt_logprobs")


def _truncate(d: dict) -> int | None:
    """``truncate_prompt_tokens``: keep the prompt's last k tokens (-1: as many as fit)."""
    v = get_int(d, "truncate_prompt_tokens")
    if v is not None and v < 1 and v != -1:
        raise bad_request(f"'truncate_prompt_tokens' must be >= 1 or -1, got {v}", "truncate_prompt_tokens")
    return v


def _cache_salt(d: dict) -> str | None:
    salt = get_str(d, "cache_salt")
    if salt is not None and not salt:
        raise bad_request("'cache_salt' must be a non-empty string", "cache_salt")
    return salt


def _model(d: dict) -> str | None:
    return get_str(d, "model")


# ---------------------------------------------------------------------------- requests
@dataclass(frozen=True)
class CompletionRequest:
    model: str | None
    prompts: list[Prompt]
    sampling: dict[str, Any]
    max_tokens: int | None          # OpenAI default 16; None = up to the context length
    logprobs: int | None
    stream: bool = False
    include_usage: bool = False
    continuous_usage: bool = False
    echo: bool = False
    return_token_ids: bool = False
    cache_salt: str | None = None   # requests share prefix-cached KV only with the same salt
    priority: int = 0               # lower is admitted first (vLLM's priority)
    field_names: dict[str, str] = field(default_factory=dict)  # SamplingParams name -> client's
    prompt_logprobs: int | None = None   # each choice carries vLLM's prompt_logprobs
    truncate_prompt_tokens: int | None = None


@dataclass(frozen=True)
class ChatRequest:
    model: str | None
    messages: list[dict[str, Any]]
    sampling: dict[str, Any]
    max_tokens: int | None          # None = up to the context length
    logprobs: bool = False
    top_logprobs: int = 0
    stream: bool = False
    include_usage: bool = False
    continuous_usage: bool = False
    add_generation_prompt: bool = True
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None         # resolved with the server's parser (server/tool_calls.py)
    return_token_ids: bool = False
    cache_salt: str | None = None
    priority: int = 0
    field_names: dict[str, str] = field(default_factory=dict)
    prompt_logprobs: int | None = None   # the response carries vLLM's prompt_logprobs
    truncate_prompt_tokens: int | None = None
    continue_final_message: bool = False


def parse_prompts(v: Any, name: str = "prompt") -> list[Prompt]:
    """A string, a list of strings, a token-id list, or a list of token-id lists."""
    if isinstance(v, str):
        return [v]
    if isinstance(v, list) and v:
        if all(_is_int(t) for t in v):
            return [list(v)]
        if all(isinstance(s, str) for s in v):
            return list(v)
        if all(isinstance(p, list) and p and all(_is_int(t) for t in p) for p in v):
            return [list(p) for p in v]
    if isinstance(v, list) and not v:
        raise bad_request(f"'{name}' must not be empty", name)
    raise bad_request(f"'{name}' must be a string, a list of strings, a list of token ids or a list "
                      f"of token-id lists", name)


def check_messages(messages: Any, name: str = "messages") -> list[dict[str, Any]]:
    """A non-empty list of message objects, each with a known role (content: the tokenizer's
    chat validation checks it)."""
    if not isinstance(messages, list) or not messages:
        raise bad_request(f"'{name}' must be a non-empty list of messages", name)
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise bad_request(f"'{name}[{i}]' must be an object with 'role' and 'content'", name)
        role = msg.get("role")
        if role not in CHAT_ROLES:
            where = f"{name}[{i}].role"
            raise bad_request(f"'{where}' must be one of {', '.join(CHAT_ROLES)}; got {role!r}", where)
    return messages


def parse_completion_request(d: dict) -> CompletionRequest:
    check_fields(d, COMPLETIONS)
    if "prompt" not in d:
        raise bad_request("'prompt' is required", "prompt")
    prompts = parse_prompts(d["prompt"])
    stream = get_bool(d, "stream", False)
    include_usage, continuous = _stream_options(d, stream)
    _check_not_streamed(d, stream)
    logprobs = get_int(d, "logprobs")
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
        raise bad_request(f"'logprobs' must be in [0, {MAX_LOGPROBS}], got {logprobs}", "logprobs")
    echo = get_bool(d, "echo", False)
    # OpenAI's default is 16 tokens; an explicit null means the rest of the context, as on chat.
    max_tokens, _ = _max_tokens(d, "max_tokens", default=None if "max_tokens" in d else 16)
    return CompletionRequest(
        model=_model(d), prompts=prompts, sampling=_sampling_fields(d),
        max_tokens=max_tokens, logprobs=logprobs, stream=stream,
        include_usage=include_usage, continuous_usage=continuous, echo=echo,
        return_token_ids=get_bool(d, "return_token_ids", False), cache_salt=_cache_salt(d),
        priority=_priority(d), prompt_logprobs=_prompt_logprobs(d), truncate_prompt_tokens=_truncate(d),
        field_names=mask_fields(d)[1])


def parse_chat_request(d: dict) -> ChatRequest:
    check_fields(d, CHAT)
    messages = check_messages(d.get("messages"))
    stream = get_bool(d, "stream", False)
    include_usage, continuous = _stream_options(d, stream)
    _check_not_streamed(d, stream)
    logprobs = get_bool(d, "logprobs", False)
    top = get_int(d, "top_logprobs", 0)
    if not 0 <= top <= MAX_LOGPROBS:
        raise bad_request(f"'top_logprobs' must be in [0, {MAX_LOGPROBS}], got {top}", "top_logprobs")
    if top and not logprobs:
        raise bad_request("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    max_tokens, max_name = _max_tokens(d, "max_completion_tokens", "max_tokens")
    spec = parse_tools(d, None, check_parser=False)
    tools = list(spec.tools) if spec is not None else None
    if spec is not None and spec.structured_outputs() is not None:
        _, so_field = structured_spec(d)
        if so_field is not None:
            raise bad_request(f"tool_choice {d.get('tool_choice')!r} is enforced with structured "
                              f"outputs and cannot be combined with '{so_field}'", so_field)
    kwargs = d.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise bad_request("'chat_template_kwargs' must be an object", "chat_template_kwargs")
    cont = get_bool(d, "continue_final_message", False)
    add_gen = get_bool(d, "add_generation_prompt", not cont)
    if cont and add_gen:
        raise bad_request("'continue_final_message' and 'add_generation_prompt' cannot both be true",
                          "continue_final_message")
    if cont and messages[-1].get("role") != "assistant":
        raise bad_request("'continue_final_message' needs the last message to have role 'assistant'",
                          "continue_final_message")
    return ChatRequest(
        model=_model(d), messages=messages, sampling=_sampling_fields(d), max_tokens=max_tokens,
        logprobs=logprobs, top_logprobs=top, stream=stream, include_usage=include_usage,
        continuous_usage=continuous, add_generation_prompt=add_gen,
        template_kwargs=kwargs, tools=tools, tool_choice=d.get("tool_choice"),
        return_token_ids=get_bool(d, "return_token_ids", False),
        cache_salt=_cache_salt(d), priority=_priority(d),
        field_names={"max_tokens": max_name, "logprobs": "top_logprobs", **mask_fields(d)[1]},
        prompt_logprobs=_prompt_logprobs(d), truncate_prompt_tokens=_truncate(d),
        continue_final_message=cont)
