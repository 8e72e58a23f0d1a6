"""Hermes / Qwen2.5 format: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``."""

from __future__ import annotations

import json
import re

from server.tool_parsers.base import ParsedCall, ToolParser, as_call

_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


class HermesToolParser(ToolParser):
    markers = ("<tool_call>",)

    def extract(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        i = text.find("<tool_call>")
        if i < 0:
            return text, []
        calls = []
        for body in _CALL.findall(text[i:]):
            try:
                call = as_call(json.loads(body), "arguments")
            except json.JSONDecodeError:
                call = None
            if call is None:
                return text, []       # a malformed call: the whole output stays content
            calls.append(call)
        content = text[:i].strip()
        return (content or None), calls
