"""Tool calling on /v1/chat/completions: the request side (tools, tool_choice) and the
response side (OpenAI ``tool_calls``, whole and streamed).

Where it sits: server/protocol.py calls ``parse_tools`` on a chat body; the tools are rendered
into the prompt through the model's chat template (jserve/tokenizer.py, ``tools=``); the
ChatHandler (server/openai_handlers.py) turns each finished sequence into a message with
``ToolCallShaper``. ``tool_choice``::

    none       tools are rendered, the output is plain content
    auto       the model decides; the --tool-call-parser format (server/tool_parsers/) is
               parsed out of the text (a 400 without a parser)
    required   a grammar forces a JSON array of one or more {"name": one of the tools,
               "parameters": its schema} objects (structured outputs): the arguments parse
    {"type": "function", "function": {"name": F}}
               a grammar forces F's arguments object; the message is one call of F
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from server.errors import bad_request
from server.tool_parsers import ParsedCall, ToolParser

NONE, AUTO, REQUIRED, NAMED = "none", "auto", "required", "named"


@dataclass(frozen=True)
class ToolSpec:
    """The tools of one request and what ``tool_choice`` asks."""

    tools: tuple[dict[str, Any], ...]
    mode: str                       # NONE, AUTO, REQUIRED or NAMED
    name: str | None = None         # NAMED: the function

    def parameters(self, name: str) -> dict[str, Any]:
        for t in self.tools:
            if t["function"]["name"] == name:
                return t["function"].get("parameters") or {"type": "object"}
        raise KeyError(name)

    def structured_outputs(self) -> dict[str, Any] | None:
        """The grammar that enforces ``required`` / a named function (None otherwise)."""
        if self.mode == NAMED:
            return {"json": self.parameters(self.name)}
        if self.mode == REQUIRED:
            items = [{"type": "object", "properties": {
                "name": {"const": t["function"]["name"]},
                "parameters": t["function"].get("parameters") or {"type": "object"}},
                "required": ["name", "parameters"], "additionalProperties": False}
                for t in self.tools]
            return {"json": {"type": "array", "minItems": 1, "items": {"anyOf": items}}}
        return None


def _check_tool(i: int, t: Any) -> dict[str, Any]:
    where = f"tools[{i}]"
    if not isinstance(t, dict) or t.get("type", "function") != "function":
        raise bad_request(f"'{where}' must be an object with type 'function'", where)
    fn = t.get("function")
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise bad_request(f"'{where}.function' must be an object with a non-empty 'name'",
                          f"{where}.function")
    params = fn.get("parameters")
    if params is not None and not isinstance(params, dict):
        raise bad_request(f"'{where}.function.parameters' must be a JSON schema object",
                          f"{where}.function.parameters")
    return {"type": "function", "function": fn}


def parse_tools(d: dict[str, Any], parser: str | None, check_parser: bool = True) -> ToolSpec | None:
    """``tools`` / ``tool_choice`` of a chat body -> ToolSpec (None: no tools); 400s name the
    field. ``parser``: the server's --tool-call-parser (needed by ``auto``; with
    ``check_parser`` False only the body's shape is checked)."""
    tools = d.get("tools")
    choice = d.get("tool_choice")
    if tools is None or tools == []:
        if choice not in (None, NONE):
            raise bad_request("'tool_choice' needs 'tools'", "tool_choice")
        return None
    if not isinstance(tools, list):
        raise bad_request("'tools' must be a list of objects", "tools")
    checked = tuple(_check_tool(i, t) for i, t in enumerate(tools))
    names = [t["function"]["name"] for t in checked]
    if len(set(names)) != len(names):
        raise bad_request("'tools' has two functions with the same name", "tools")
    if choice is None:
        choice = AUTO if parser or not check_parser else NONE
    if choice == NONE:
        return ToolSpec(checked, NONE)
    if choice == AUTO:
        if parser is None and check_parser:
            raise bad_request("tool_choice 'auto' needs the server started with --tool-call-parser "
                              "(hermes or llama3_json); 'required' and a named function work "
                              "without it", "tool_choice")
        return ToolSpec(checked, AUTO)
    if choice == REQUIRED:
        return ToolSpec(checked, REQUIRED)
    if isinstance(choice, dict) and choice.get("type") == "function" \
            and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if name not in names:
            raise bad_request(f"'tool_choice.function.name' {name!r} is not one of the tools "
                              f"({', '.join(names)})", "tool_choice")
        return ToolSpec(checked, NAMED, name)
    raise bad_request("'tool_choice' must be 'none', 'auto', 'required' or "
                      "{'type': 'function', 'function': {'name': ...}}", "tool_choice")


def new_call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex[:24]}"


def call_json(index: int | None, call: ParsedCall, call_id: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"id": call_id or new_call_id(), "type": "function",
                           "function": {"name": call.name, "arguments": call.arguments}}
    if index is not None:
        out = {"index": index, **out}
    return out


def forced_calls(spec: ToolSpec, text: str) -> list[ParsedCall]:
    """The calls of a grammar-forced output (``required``: the array; named: the arguments).
    A sequence cut short (max_tokens) does not parse: no calls."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return []
    if spec.mode == NAMED:
        return [ParsedCall(spec.name, json.dumps(value, ensure_ascii=False))] \
            if isinstance(value, dict) else []
    calls = []
    for item in value if isinstance(value, list) else []:
        if isinstance(item, dict) and isinstance(item.get("name"), str):
            calls.append(ParsedCall(item["name"], json.dumps(item.get("parameters", {}),
                                                             ensure_ascii=False)))
    return calls


def shape_message(spec: ToolSpec | None, parser: ToolParser | None, text: str,
                  finish_reason: str | None) -> tuple[dict[str, Any], str | None]:
    """A finished sequence -> (the OpenAI assistant message, finish_reason)."""
    if spec is None or spec.mode == NONE:
        return {"role": "assistant", "content": text}, finish_reason
    if spec.mode in (NAMED, REQUIRED):
        calls, content = forced_calls(spec, text), None
    else:
        assert parser is not None
        content, calls = parser.extract(text)
    if not calls:
        return {"role": "assistant", "content": text}, finish_reason
    msg = {"role": "assistant", "content": content,
           "tool_calls": [call_json(None, c) for c in calls]}
    if spec.mode != NAMED and finish_reason == "stop":
        finish_reason = "tool_calls"
    return msg, finish_reason
