"""Regular structured-outputs specs as dense token automata for the device.

Where it sits: a spec's ``StructuredOutputsParams.key`` -> ``AutomatonCompiler.compile`` (here,
cached per spec) -> a ``TokenAutomaton`` (next-state table int16[n, V]) -> the engine's device
table (jserve/structured/automaton_pool.py) -> in the jitted step's sampler, a row's mask is
``table[state] >= 0`` and its advance ``table[state, token]``: two gathers, no host work per token.
Why: the host's grammar chain and the split step's second launch cap the H200 constrained/free
ratio near 0.70 (benchmarks/RESULTS.md, sessions 29-32).

What it takes: regexes, choices, and JSON schemas without recursion whose keywords all lie in
``SUPPORTED_KEYWORDS`` (checked and rewritten here: $refs inlined, integer bounds as digit
regexes, patterns kept to characters JSON needs not escape; then outlines-core builds the regex
and the token index). The rest (json_object, grammar, other keywords, recursion, regexes outlines
or llguidance refuse, over ``max_states`` states) -> None: it stays on llguidance (constraints.py).
Narrower than llguidance, every output still valid: no properties beyond ``properties`` (llguidance
allows extras when ``additionalProperties`` is absent), canonical integers (no ``-0``), signed
exponents, no ``\\u`` (hex code point) escapes, a ``pattern`` matches the whole string.
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import llguidance
import numpy as np
import outlines_core as oc
from outlines_core.json_schema import build_regex_from_schema

from jserve.structured.automaton_worker import IndexWorker
from jserve.structured.canonical import force_canonical

_ANNOTATIONS = frozenset("title description default examples $schema $id $comment $defs definitions".split())
_TYPE_KEYWORDS = {"string": frozenset({"minLength", "maxLength", "pattern"}),
                  "integer": frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"}),
                  "number": frozenset(), "boolean": frozenset(), "null": frozenset(),
                  "object": frozenset({"properties", "required", "additionalProperties"}),
                  "array": frozenset({"items", "minItems", "maxItems"})}
SUPPORTED_KEYWORDS = (_ANNOTATIONS | {"type", "enum", "const", "anyOf", "allOf", "$ref"}
                      | frozenset().union(*_TYPE_KEYWORDS.values()))
MAX_REGEX_CHARS = 1 << 16
# From this many vocabulary ids outlines' index is built in a child process: its transition dict,
# one call holding the interpreter lock, stalled the process ~0.4 s at 152k ids (~22 ms at 8k;
# benchmarks/automaton_compile.py)
WORKER_MIN_VOCAB = 1 << 15
WORKER_TIMEOUT_S = 300.0   # a spec whose index takes longer gets no automaton (the host path)
_RUST_META = frozenset("\\.+*?()|[]{}^$#&-~")
_UNSAFE = r"\x{22}\x{5C}\x{0}-\x{1F}\x{7F}-\x{9F}\x{2028}\x{2029}"   # what JSON strings escape
_LIT = "[A-Za-z0-9_ ,:;@!%'=<>/]|[^\\x00-\\x9f\\u2028\\u2029]"       # safe in JSON and in Rust
_PAT_TOKEN = re.compile(rf"\\[dw.+*?()|\[\]{{}}^$/-]|\{{\d+(?:,\d*)?\}}|\(\?:|[()|*+?.-]|{_LIT}"
                        rf"|\[\^?(?:[a-z]-[a-z]|[A-Z]-[A-Z]|[0-9]-[0-9]|\\[dw.\-]|{_LIT})+\]")
_unsafe = lambda c: c in '"\\' or ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F or c in "\u2028\u2029"
_IS = {"string": lambda v: isinstance(v, str), "boolean": lambda v: isinstance(v, bool),
       "null": lambda v: v is None, "object": lambda v: isinstance(v, dict),
       "array": lambda v: isinstance(v, list), "number": lambda v: type(v) in (int, float),
       "integer": lambda v: type(v) is int or (type(v) is float and v.is_integer())}
_BOUNDS = {"minimum": math.ceil, "exclusiveMinimum": lambda v: math.floor(v) + 1,
           "maximum": math.floor, "exclusiveMaximum": lambda v: math.ceil(v) - 1}
_MARK = "JSERVEINT"   # the const that stands for a bounded integer until its regex replaces it
_STRING_CHAR = r'([^"\\\x00-\x1F\x7F-\x9F]|\\["\\/bfnrt])'   # outlines' (no "\/": llguidance has none)


@dataclass(frozen=True, eq=False)   # (identity hash: the arrays are not hashable)
class TokenAutomaton:
    """A regular spec over token ids; local states 0..n-1."""
    next: np.ndarray    # int16[n, V]: the state after (state, token); -1: not allowed. Every eos
                        # id is allowed (a self-loop) exactly in final states.
    initial: int        # the start state
    done: np.ndarray    # bool[n]: complete states (nothing but eos ids allowed)

    @property
    def num_states(self) -> int:
        return int(self.next.shape[0])


def token_bytes(tokenizer: llguidance.LLTokenizer, vocab_size: int) -> list[bytes | None]:
    """Bytes of every id < vocab_size (list[V]); None for special ids and ids past the tokenizer's."""
    n = min(vocab_size, tokenizer.vocab_size)
    return [None if tokenizer.is_special_token(i) else tokenizer.decode_bytes([i]) or None
            for i in range(n)] + [None] * (vocab_size - n)


def escape(text: str) -> str:   # ``text`` as a literal of the Rust regex dialect
    return "".join("\\" + c if c in _RUST_META else c for c in text)


def _int_range(lo: int | None, hi: int | None) -> str:
    """Regex of the canonical JSON integers in [lo, hi] (None: unbounded)."""
    group = lambda r: f"(?:{r})" if "|" in r else r
    def same_len(lo: str, hi: str) -> str:   # the digit strings lo..hi, of one length
        k = len(lo) - 1
        if lo == hi:
            return lo
        if lo[0] == hi[0]:
            return lo[0] + group(same_len(lo[1:], hi[1:]))
        if lo[1:] != "0" * k:
            return same_len(lo, lo[0] + "9" * k) + "|" + same_len(str(int(lo[0]) + 1) + "0" * k, hi)
        if hi[1:] != "9" * k:
            return same_len(lo, str(int(hi[0]) - 1) + "9" * k) + "|" + same_len(hi[0] + "0" * k, hi)
        return f"[{lo[0]}-{hi[0]}]" + (f"[0-9]{{{k}}}" if k else "")

    def magnitudes(a: int, b: int | None) -> str:   # a..b, 0 <= a <= b (None: unbounded)
        d, top = len(str(a)), b if b is not None else 10 ** len(str(a)) - 1
        parts = [same_len(str(max(a, 10 ** (e - 1) if e > 1 else 0)), str(min(top, 10 ** e - 1)))
                 for e in range(d, len(str(top)) + 1)]
        return "|".join(parts + ([f"[1-9][0-9]{{{d},}}"] if b is None else []))
    parts = [magnitudes(max(lo or 0, 0), hi)] if hi is None or hi >= 0 else []
    if lo is None or lo < 0:
        parts.append("-" + group(magnitudes(1 if hi is None or hi >= 0 else -hi, lo and -lo)))
    return "(?:" + "|".join(parts) + ")"


def _pattern(p: str, limit: int) -> str:
    """A JSON-schema ``pattern`` as a Rust regex of whole strings whose characters a JSON string
    needs not escape: literals, classes (ranges within a-z, A-Z or 0-9), ``\\d \\w`` (ASCII), ``.``,
    groups, alternation, quantifiers; a leading ^ and a trailing $ dropped. Else ValueError."""
    p = p[p.startswith("^"):len(p) - (p.endswith("$") and not p.endswith("\\$"))]
    out, pos, depth, low = [], 0, 0, 0
    while pos < len(p):
        m = _PAT_TOKEN.match(p, pos)
        if m is None:
            raise ValueError(f"pattern at {p[pos:]!r}")
        t, pos = m[0], m.end()
        if t[0] == "[":
            body = t[1:-1].replace("\\d", "0-9").replace("\\w", "0-9A-Za-z_")
            t = f"[{body}{_UNSAFE}]" if body.startswith("^") else f"[{body}]"
        elif t in ("\\d", "\\w", "."):
            t = {"\\d": "[0-9]", "\\w": "[0-9A-Za-z_]", ".": f"[^{_UNSAFE}]"}[t]
        elif t[0] == "\\":
            t = escape(t[1])
        elif t[0] == "{" and max(map(int, re.findall(r"\d+", t))) > limit:
            raise ValueError("pattern repetition")
        elif t in ("(", "(?:", ")"):
            depth, t = depth + (1 if t != ")" else -1), "(?:" if t != ")" else t
            low = min(low, depth)
        out.append(t)
    if depth or low < 0:
        raise ValueError("pattern parentheses")
    return "".join(out)


def _schema_regex(text: str, whitespace: str, limit: int) -> str:
    """The regex of a JSON schema: outlines-core's, of the schema checked and rewritten here."""
    root, ranges = json.loads(text), []
    if _MARK in text:
        raise ValueError("placeholder collision")

    def plain(v: Any) -> bool:   # outlines writes it as JSON (object keys unescaped in the regex)
        if isinstance(v, dict):
            return all(not any(_unsafe(c) or c in _RUST_META for c in k) and plain(x) for k, x in v.items())
        return all(map(plain, v)) if isinstance(v, list) else v is None or isinstance(v, (str, bool)) or (
            type(v) is int and abs(v) < 2 ** 53) or (type(v) is float and math.isfinite(v))

    def norm(s: Any, refs: frozenset[str]) -> dict:
        if not isinstance(s, dict) or ("$id" in s and s is not root):
            raise ValueError("schema")
        keys = set(s) - _ANNOTATIONS
        if not keys <= SUPPORTED_KEYWORDS or (keys & {"$ref", "anyOf", "allOf"} and len(keys) > 1):
            raise ValueError(f"keywords {sorted(keys)}")
        if "$ref" in keys:
            ref, target = s["$ref"], root
            if not isinstance(ref, str) or not ref.startswith("#") or "%" in ref or ref in refs:
                raise ValueError("$ref recursive or not local")
            for part in filter(None, ref[1:].split("/")):
                part = part.replace("~1", "/").replace("~0", "~")
                target = target[part] if isinstance(target, dict) and part in target else None
            return norm(target, refs | {ref})
        if keys & {"anyOf", "allOf"}:   # outlines concatenates allOf's parts: one part only
            subs = s.get("anyOf", s.get("allOf"))
            if not isinstance(subs, list) or not subs or ("allOf" in keys and len(subs) != 1):
                raise ValueError("anyOf / allOf")
            return {"anyOf": [norm(x, refs) for x in subs]}
        types = [s["type"]] if isinstance(s.get("type"), str) else s.get("type")
        if (types is not None or not keys & {"enum", "const"}) and not (
                isinstance(types, list) and types and all(t in _TYPE_KEYWORDS for t in types)):
            raise ValueError("type")
        if keys & {"enum", "const"}:
            values = s["enum"] if "enum" in s else [s["const"]]
            if not (keys - {"type"} in ({"enum"}, {"const"}) and isinstance(values, list) and values and all(
                    plain(v) and (types is None or any(_IS[t](v) for t in types)) for v in values)):
                raise ValueError("enum / const")
            return {"enum": values}
        if not keys - {"type"} <= set().union(*map(_TYPE_KEYWORDS.get, types)):
            raise ValueError("keywords of another type")
        out = [typed(t, {k: s[k] for k in keys & _TYPE_KEYWORDS[t]}, refs) for t in dict.fromkeys(types)]
        return out[0] if len(out) == 1 else {"anyOf": out}

    def typed(t: str, kw: dict, refs: frozenset[str]) -> dict:
        if t == "string" and "pattern" in kw:   # outlines ignores a pattern beside lengths
            if len(kw) > 1 or not isinstance(kw["pattern"], str):
                raise ValueError("pattern beside lengths")
            return {"type": "string", "pattern": "^(?:" + _pattern(kw["pattern"], limit) + ")$"}
        if t == "integer":   # outlines ignores bounds: a const placeholder for the range's regex
            if any(type(v) not in (int, float) or not abs(v) <= 10 ** 18 for v in kw.values()):
                raise ValueError("integer bounds")
            b = {k: _BOUNDS[k](v) for k, v in kw.items()}
            lo = max((b[k] for k in ("minimum", "exclusiveMinimum") if k in b), default=None)
            hi = min((b[k] for k in ("maximum", "exclusiveMaximum") if k in b), default=None)
            if lo is not None and hi is not None and lo > hi:
                raise ValueError("empty integer range")
            ranges.append(_int_range(lo, hi))
            return {"const": f"{_MARK}{len(ranges) - 1}Q"}
        if t == "object":   # outlines never writes properties beyond ``properties``
            props, req = kw.get("properties"), kw.get("required", [])
            if (not isinstance(props, dict) or kw.get("additionalProperties", False) is not False
                    or not isinstance(req, list) or not all(isinstance(r, str) and r in props for r in req)
                    or any(_unsafe(c) for k in props for c in k)):
                raise ValueError("object")
            return {"type": "object", "properties": {k: norm(v, refs) for k, v in props.items()},
                    "required": list(dict.fromkeys(req))}
        lengths = {"string": ("minLength", "maxLength"), "array": ("minItems", "maxItems")}.get(t)
        lo, hi = (kw.get(lengths[0], 0), kw.get(lengths[1], limit)) if lengths else (0, 0)
        if not all(type(v) is int and 0 <= v <= limit for v in (lo, hi)) or lo > hi:
            raise ValueError("lengths")   # (one over limit needs more than limit states)
        if t == "array" and "items" not in kw:
            raise ValueError("array without items")
        return {"type": t, **kw, **({"items": norm(kw["items"], refs)} if t == "array" else {})}

    regex = build_regex_from_schema(json.dumps(norm(root, frozenset())), whitespace_pattern=whitespace)
    regex = regex.replace(_STRING_CHAR, _STRING_CHAR.replace("/", ""))
    for i, r in enumerate(ranges):
        if f'"{_MARK}{i}Q"' not in regex:   # (items' regex appears twice in an array's)
            raise ValueError("placeholder")
        regex = regex.replace(f'"{_MARK}{i}Q"', r)
    return regex


class AutomatonCompiler:
    """Spec keys -> ``TokenAutomaton`` over one model's vocabulary, LRU-cached (thread-safe)."""

    def __init__(self, tokens: list[bytes | None], eos_token_ids: tuple[int, ...], vocab_size: int,
                 max_states: int, capacity: int = 64,
                 tokenize: Callable[[bytes], list[int]] | None = None,
                 worker: bool | None = None) -> None:
        """``tokenize``: the model tokenizer's bytes -> ids; given, forced text takes its canonical
        tokenization (jserve/structured/canonical.py). ``worker``: build outlines' indexes in a
        child process (jserve/structured/automaton_worker.py); None: when the vocabulary has
        ``WORKER_MIN_VOCAB`` ids or more."""
        if not 0 < max_states <= np.iinfo(np.int16).max:
            raise ValueError(f"max_states must be in 1..32767, got {max_states}")
        self.vocab_size, self.max_states, self.capacity = vocab_size, max_states, capacity
        self.eos = np.array(sorted({int(e) for e in eos_token_ids if 0 <= e < vocab_size}), np.int64)
        self._tokens = list(tokens[:vocab_size]) + [None] * max(0, vocab_size - len(tokens))
        self._vocab = self._worker = None
        groups = _token_groups(self._tokens, self.eos) if len(self.eos) else {}
        if groups and (worker if worker is not None else vocab_size >= WORKER_MIN_VOCAB):
            self._worker = IndexWorker(self._tokens, self.eos, vocab_size, max_states, WORKER_TIMEOUT_S)
        elif groups:
            self._vocab = oc.Vocabulary(int(self.eos[0]), groups)
        self._cache: OrderedDict[tuple, TokenAutomaton | None] = OrderedDict()
        self._lock = threading.Lock()
        self._tokenize = tokenize

    def close(self) -> None:
        """Stop the index worker, if one runs (a later compile starts it again)."""
        if self._worker is not None:
            self._worker.close()

    def peek(self, key: tuple[str, str, bool]) -> tuple[bool, TokenAutomaton | None]:
        """(whether ``key`` is compiled, its automaton or None) without compiling it."""
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return True, self._cache[key]
        return False, None

    def compile(self, key: tuple[str, str, bool]) -> TokenAutomaton | None:
        """The automaton of a spec key (``StructuredOutputsParams.key``), cached (None too); None
        when the spec is not regular or not safely supported, or needs more than max_states."""
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        kind, text, flexible = key
        try:
            if kind == "regex" and llguidance.LLMatcher.validate_grammar_with_warnings(
                    llguidance.LLMatcher.grammar_from_regex(text))[0]:
                raise ValueError("a regex llguidance refuses")   # (the wrapping below could hide it)
            regex = (text if kind == "regex" else "(?:" + "|".join(map(escape, json.loads(text))) + ")"
                     if kind == "choice" else _schema_regex(text, r"[ \t\n\r]*" if flexible else "",
                                                            self.max_states) if kind == "json" else None)
            # outlines' DFA is leftmost-first: "a|ab" would lose "ab" without the "$"
            automaton = self._build(f"(?:{regex})$") if regex is not None and len(regex) <= MAX_REGEX_CHARS \
                else None
        except Exception:  # noqa: BLE001 - bad JSON, unsupported schemas, regexes outlines refuses
            automaton = None
        with self._lock:
            self._cache[key] = automaton
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        return automaton

    def _build(self, regex: str) -> TokenAutomaton | None:
        """The automaton of an anchored regex: outlines' index and its raw table (here or in the
        worker), then forced runs cut to their canonical split."""
        if self._worker is not None:
            built = self._worker.table(regex)
        elif self._vocab is not None:
            built = raw_table(oc.Index(regex, self._vocab), self.eos, self.vocab_size, self.max_states)
        else:
            built = None
        if built is None:
            return None
        table, start, done = built
        if self._tokenize is not None:
            table, start, done = force_canonical(table, start, done, self._tokens, self.eos, self._tokenize)
        return TokenAutomaton(table, start, done)


def _token_groups(tokens: list[bytes | None], eos: np.ndarray) -> dict[bytes, list[int]]:
    """Each token's bytes -> its ids (eos ids and empty tokens left out)."""
    groups: dict[bytes, list[int]] = {}
    skip = set(eos.tolist())
    for i, b in enumerate(tokens):
        if b and i not in skip:
            groups.setdefault(b, []).append(i)
    return groups


def outlines_vocabulary(tokens: list[bytes | None], eos: np.ndarray, vocab_size: int) -> oc.Vocabulary | None:
    """outlines-core's vocabulary of ``tokens`` (ids < vocab_size, eos ids and empty ones left
    out); None when there is no eos id or no other token."""
    groups = _token_groups(tokens[:vocab_size], eos) if len(eos) else {}
    return oc.Vocabulary(int(eos[0]), groups) if groups else None


def raw_table(index: oc.Index, eos: np.ndarray, vocab_size: int, max_states: int
              ) -> tuple[np.ndarray, int, np.ndarray] | None:
    """The dense table of an outlines index -> (int16[n, V] next states, initial, bool[n] done):
    states renumbered, those that cannot reach a final state dropped (they would allow no token),
    every eos id a self-loop of the final states. None: over ``max_states`` or an empty language."""
    trans, finals = index.get_transitions(), index.get_final_states()
    ids = np.array(sorted(set(trans) | finals), np.int64)
    n, arcs = len(ids), []
    adj = np.zeros((n, n), bool)   # adj[i, j]: some token moves state i to state j
    for i, s in enumerate(ids.tolist()):
        d = trans.get(s, {})
        t, x = np.fromiter(d.keys(), np.int64, len(d)), np.fromiter(d.values(), np.int64, len(d))
        pos = np.minimum(np.searchsorted(ids, x), n - 1)
        keep = (ids[pos] == x) & (t != eos[0])
        arcs.append((t[keep], pos[keep]))
        adj[i, pos[keep]] = True
    final = np.isin(ids, list(finals))
    live, todo = final.copy(), np.flatnonzero(final).tolist()
    while todo:   # backwards from the final states
        new = np.flatnonzero(adj[:, todo.pop()] & ~live)
        live[new] = True
        todo += new.tolist()
    initial = int(np.searchsorted(ids, index.get_initial_state()))
    if not live[initial] or live.sum() > max_states:
        return None
    local = np.where(live, np.cumsum(live) - 1, -1)
    table = np.full((int(live.sum()), vocab_size), -1, np.int16)
    for i in np.flatnonzero(live).tolist():
        t, nxt = arcs[i][0], local[arcs[i][1]]
        table[local[i], t[nxt >= 0]] = nxt[nxt >= 0]
    rows, done = local[final & live], np.zeros(len(table), bool)
    table[rows[:, None], eos[None, :]] = rows[:, None]
    done[rows] = (table[rows] >= 0).sum(1) == len(eos)
    return table, int(local[initial]), done
