"""Request bodies -> JSON values that are safe to hand to the parsers (depth, text, numbers).

Where it sits: the first thing the HTTP app does with a body (server/http_app.py), before the
field parsers of server/protocol.py. ``json.loads`` alone accepts things that later become 500s
or stalls; this module turns each into a 400 that names where in the body the problem is::

    bytes --json.loads--> value --check_value--> dict handed to the parsers
      malformed / not UTF-8 / NaN, Infinity          400 "malformed JSON body ..."
      nested deeper than MAX_JSON_DEPTH (64)         400 naming the path, e.g. "messages[0].content"
      a lone UTF-16 surrogate ("\\ud800", raw ED A0 80) 400 naming the path (tokenizers need real text)
      an integer of more than MAX_INT_DIGITS (40)    400 naming the path (never Python's
                                                     "Exceeds the limit (4300 digits)" text)

``check_value`` is also what the gRPC front-end would use on free-form text; paths are written
the way a client spells them: ``prompt``, ``messages[2].content``, ``stop[0]``.
"""

from __future__ import annotations

import json
from typing import Any

from server.errors import bad_request

MAX_JSON_DEPTH = 64          # objects/arrays nested deeper than this are refused
MAX_INT_DIGITS = 40          # integers longer than this are refused (no field needs more)


class _HugeInt(str):
    """The digits of an integer too long to be a valid value of any field (kept as text)."""


def _parse_int(text: str) -> int | _HugeInt:
    digits = len(text) - (text[:1] == "-")
    if digits > MAX_INT_DIGITS:
        return _HugeInt(text)
    return int(text)


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def _child(path: str, key: int | str) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def has_lone_surrogate(text: str) -> bool:
    """True if ``text`` holds a UTF-16 surrogate code point (not encodable as UTF-8)."""
    if text.isascii():
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def check_text(text: str, path: str) -> None:
    """400 naming ``path`` when ``text`` is not valid Unicode text (a lone surrogate)."""
    if has_lone_surrogate(text):
        raise bad_request(f"'{path}' contains a lone UTF-16 surrogate (invalid Unicode text); "
                          "send valid UTF-8", path or None)


def check_value(value: Any, root: str = "") -> None:
    """Walk a decoded JSON value: depth, lone surrogates (values and keys), huge integers.

    Iterative (a crafted body cannot exhaust the stack); a list of plain ints (token ids) is
    checked in one pass.
    """
    stack: list[tuple[Any, str, int]] = [(value, root, 0)]
    while stack:
        v, path, depth = stack.pop()
        if isinstance(v, _HugeInt):
            raise bad_request(f"'{path}' is an integer of {len(v)} characters, out of range for "
                              "any field", path or None)
        if isinstance(v, str):
            check_text(v, path)
        elif isinstance(v, (dict, list)):
            if depth >= MAX_JSON_DEPTH:
                raise bad_request(f"'{path}' is nested more than {MAX_JSON_DEPTH} levels deep "
                                  "(the limit for request bodies)", path or None)
            if isinstance(v, dict):
                for k, item in v.items():
                    check_text(k, _child(path, k))
                    if not isinstance(item, (int, float, bool)) or isinstance(item, _HugeInt):
                        stack.append((item, _child(path, k), depth + 1))
            elif not all(type(t) is int for t in v):
                stack.extend((item, _child(path, i), depth + 1) for i, item in enumerate(v)
                             if not isinstance(item, (int, float, bool)) or isinstance(item, _HugeInt))


def parse_json_body(body: bytes) -> dict[str, Any]:
    """A request body -> its JSON object; APIError(400) for anything that is not a clean one."""
    try:
        text = body.decode("utf-8", "surrogatepass")   # raw surrogate bytes: named by check_value
    except UnicodeDecodeError as e:
        raise bad_request(f"malformed JSON body: not UTF-8 ({e})") from e
    try:
        data = json.loads(text, parse_int=_parse_int, parse_constant=_no_constant)
    except RecursionError as e:
        raise bad_request(f"malformed JSON body: nested more than {MAX_JSON_DEPTH} levels deep "
                          "(the limit for request bodies)") from e
    except ValueError as e:  # JSONDecodeError, NaN / Infinity
        raise bad_request(f"malformed JSON body: {e}") from e
    if not isinstance(data, dict):
        raise bad_request(f"the JSON body must be an object, got {type(data).__name__}")
    check_value(data)
    return data
