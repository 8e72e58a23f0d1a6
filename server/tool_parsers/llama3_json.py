"""Llama 3.1 JSON format: the whole output is ``[<|python_tag|>]{"name": ..., "parameters":
{...}}``, several calls separated by ``;``."""

from __future__ import annotations

import json

from server.tool_parsers.base import ParsedCall, ToolParser, as_call

_TAG = "<|python_tag|>"


class Llama3JsonToolParser(ToolParser):
    markers = (_TAG, "{")

    def start_offset(self, text: str) -> int | None:
        s = text.lstrip()
        if not s:
            return 0                           # nothing yet: hold
        if s.startswith("{") or _TAG.startswith(s[:len(_TAG)]) or s.startswith(_TAG):
            return len(text) - len(s)          # a call starts the output: hold it all
        return None                            # plain content

    def extract(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        s = text.strip()
        if s.startswith(_TAG):
            s = s[len(_TAG):].strip()
        if not s.startswith("{"):
            return text, []
        dec = json.JSONDecoder()
        calls, i = [], 0
        while i < len(s):
            try:
                obj, end = dec.raw_decode(s, i)
            except json.JSONDecodeError:
                return text, []
            call = as_call(obj, "parameters")
            if call is None:
                return text, []
            calls.append(call)
            i = end
            while i < len(s) and s[i] in " \n\t;":
                i += 1
        return None, calls
