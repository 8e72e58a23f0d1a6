"""Tool-call parsers: a model's raw text -> (content, OpenAI tool calls), whole or streamed.

Where it sits: server/tool_calls.py picks the parser named by ``--tool-call-parser`` for chat
requests with ``tool_choice`` "auto" (``required`` and named functions are enforced by a
grammar instead and need no parser). Formats::

    hermes       <tool_call>{"name": "f", "arguments": {...}}</tool_call> (any number, after text)
    llama3_json  [<|python_tag|>]{"name": "f", "parameters": {...}}[; {...}]  (the whole output)

Streaming (``StreamingToolText``): text is passed through as content until it may begin a
tool call; from there it is held and parsed when the sequence ends, so the client gets
content deltas, then the tool calls as one delta each.
"""

from __future__ import annotations

from server.tool_parsers.base import ParsedCall, StreamingToolText, ToolParser
from server.tool_parsers.hermes import HermesToolParser
from server.tool_parsers.llama3_json import Llama3JsonToolParser

PARSERS: dict[str, type[ToolParser]] = {"hermes": HermesToolParser,
                                        "llama3_json": Llama3JsonToolParser}


def get_tool_parser(name: str) -> ToolParser:
    """The parser named ``name``; ValueError listing the choices otherwise."""
    cls = PARSERS.get(name)
    if cls is None:
        raise ValueError(f"--tool-call-parser: unknown parser {name!r} (choices: "
                         f"{', '.join(sorted(PARSERS))})")
    return cls()


__all__ = ["PARSERS", "ParsedCall", "StreamingToolText", "ToolParser", "get_tool_parser"]
