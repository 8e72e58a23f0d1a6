"""The tool-parser interface and the streaming hold-back shared by every format."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str          # a JSON object, as text


def as_call(obj: Any, args_key: str) -> ParsedCall | None:
    """{"name": str, args_key: object} -> ParsedCall (``arguments`` accepted as an alias)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(args_key, obj.get("arguments", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return ParsedCall(obj["name"], json.dumps(args, ensure_ascii=False))


class ToolParser:
    """One format. ``extract`` parses a whole output; ``start_offset`` says where (if at all)
    a tool call may begin in a prefix of it, for streaming."""

    markers: tuple[str, ...] = ()

    def extract(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        """-> (content, or None when there is none; the tool calls found)."""
        raise NotImplementedError

    def start_offset(self, text: str) -> int | None:
        """Index from which ``text`` (a prefix of the output) may be a tool call; None: all of
        it is content whatever follows. Default: the first marker, or a marker's prefix at the
        end of the text."""
        for m in self.markers:
            i = text.find(m)
            if i >= 0:
                return i
        for k in range(min(max((len(m) for m in self.markers), default=0), len(text)), 0, -1):
            if any(m.startswith(text[-k:]) for m in self.markers):
                return len(text) - k
        return None


class StreamingToolText:
    """Per sequence: content deltas out as soon as they cannot be part of a tool call."""

    def __init__(self, parser: ToolParser) -> None:
        self.parser = parser
        self.text = ""
        self.sent = 0                # characters already sent as content

    def feed(self, delta: str) -> str:
        """Add text; -> the content that can be sent now."""
        self.text += delta
        start = self.parser.start_offset(self.text)
        upto = len(self.text) if start is None else max(start, self.sent)
        out = self.text[self.sent:upto]
        self.sent = upto
        return out

    def finish(self) -> tuple[str, list[ParsedCall]]:
        """At the end: -> (content not sent yet, tool calls)."""
        content, calls = self.parser.extract(self.text)
        if not calls:
            rest = self.text[self.sent:]
            self.sent = len(self.text)
            return rest, []
        start = self.parser.start_offset(self.text)
        start = len(self.text) if start is None else start
        rest = self.text[self.sent:start].rstrip() if start > self.sent else ""
        self.sent = len(self.text)
        return rest, calls
