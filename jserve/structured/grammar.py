"""Grammar specs and their compilation (llguidance), cached per spec.

Where it sits: ``SamplingParams.structured_outputs`` holds a ``StructuredOutputsParams`` (what
the user asked: a JSON schema, any JSON object, a regex, a choice, or an EBNF/GBNF/Lark
grammar). The engine compiles it once per distinct spec with ``GrammarCache.compile`` (the
llguidance grammar string plus a validation against the tokenizer), and
``constraints.ConstraintTracker`` builds one ``LLMatcher`` per sequence from the cached grammar.

Why llguidance (measured in benchmarks/RESULTS.md, "Structured outputs"): a dependency-free
wheel (xgrammar's requires torch, transformers and triton), no ahead-of-time per-vocabulary
compile (the mask is computed lazily over a token trie), and a parallel batch mask call that
releases the GIL.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import llguidance

_KINDS = ("json", "json_object", "regex", "choice", "grammar")
MAX_SPEC_CHARS = 1 << 20


@dataclass(frozen=True)
class StructuredOutputsParams:
    """One constraint on the output (vLLM's ``StructuredOutputsParams``): exactly one of
    ``json`` (a JSON schema, dict or string), ``json_object`` (any JSON object), ``regex``,
    ``choice`` (a list of strings) or ``grammar`` (EBNF / GBNF / Lark text).

    ``whitespace_flexible``: JSON may contain free whitespace between tokens (off by default:
    compact JSON, which also keeps a weak model from emitting whitespace forever).
    """

    json: str | dict | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    whitespace_flexible: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.choice, list):
            object.__setattr__(self, "choice", tuple(self.choice))
        if isinstance(self.json, dict):  # frozen + hashable: keep the text
            object.__setattr__(self, "json", json.dumps(self.json))  # key order matters
        if not isinstance(self.whitespace_flexible, bool):
            raise ValueError("structured_outputs.whitespace_flexible: must be a boolean")
        given = [k for k in _KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError("structured_outputs: exactly one of json, json_object, regex, choice, "
                             f"grammar must be given, got {given or 'none'}")
        kind = given[0]
        value = getattr(self, kind)
        if kind == "json" and not isinstance(value, str):
            raise ValueError("structured_outputs.json: must be a JSON schema (object or string)")
        if kind in ("regex", "grammar") and (not isinstance(value, str) or not value):
            raise ValueError(f"structured_outputs.{kind}: must be a non-empty string")
        if kind == "choice":
            if not value or not all(isinstance(c, str) and c for c in value):
                raise ValueError("structured_outputs.choice: must be a non-empty list of "
                                 "non-empty strings")
        if kind == "json_object" and value is not True:
            raise ValueError("structured_outputs.json_object: must be true")
        if len(self.key[1]) > MAX_SPEC_CHARS:
            raise ValueError(f"structured_outputs.{kind}: longer than {MAX_SPEC_CHARS} characters")

    @property
    def kind(self) -> str:
        return next(k for k in _KINDS if getattr(self, k) not in (None, False))

    @property
    def key(self) -> tuple[str, str, bool]:
        """Hashable identity of the spec: (kind, text, whitespace_flexible)."""
        kind = next(k for k in _KINDS if getattr(self, k) not in (None, False))
        value: Any = getattr(self, kind)
        text = json.dumps(list(value)) if kind == "choice" else "" if kind == "json_object" else value
        return kind, text, self.whitespace_flexible

    @classmethod
    def from_dict(cls, d: dict, field: str = "structured_outputs") -> StructuredOutputsParams:
        """From vLLM's request dict (``{"json": ...}``, ``{"regex": ...}``, ...); unknown keys
        raise a ValueError naming them."""
        if not isinstance(d, dict):
            raise ValueError(f"{field}: must be an object")
        known = set(_KINDS) | {"whitespace_flexible"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{field}: unknown key(s) {', '.join(unknown)} (supported: "
                             f"{', '.join(sorted(known))})")
        try:
            return cls(**{k: v for k, v in d.items() if v is not None})
        except ValueError as e:
            raise ValueError(str(e).replace("structured_outputs", field, 1)) from None


def _to_grammar(key: tuple[str, str, bool]) -> str:
    kind, text, flexible = key
    opts = {"whitespace_flexible": flexible}
    if kind == "json":
        try:
            schema = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"structured_outputs: the JSON schema is not valid JSON: {e}") from None
        if not isinstance(schema, (dict, bool)):
            raise ValueError("structured_outputs: a JSON schema must be an object")
        return llguidance.LLMatcher.grammar_from_json_schema(text, overrides=opts)
    if kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema('{"type": "object"}', overrides=opts)
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(text)
    if kind == "choice":
        return llguidance.grammar_from("choice", text)
    try:
        return llguidance.grammar_from("grammar", text)
    except ValueError as e:
        raise ValueError(f"structured_outputs: bad grammar: {e}") from None


class GrammarCache:
    """Compiled (validated) llguidance grammars per spec, LRU-bounded; thread-safe (the server
    compiles on its tokenizer pool)."""

    def __init__(self, tokenizer: llguidance.LLTokenizer, capacity: int = 512) -> None:
        self.tokenizer = tokenizer
        self.capacity = capacity
        self._cache: OrderedDict[tuple, str] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def compile(self, spec: StructuredOutputsParams) -> str:
        """-> the llguidance grammar of ``spec``; ValueError naming the problem if it is bad."""
        key = spec.key
        with self._lock:
            g = self._cache.get(key)
            if g is not None:
                self._cache.move_to_end(key)
                self.hits += 1
                return g
        g = _to_grammar(key)
        is_error, msgs = llguidance.LLMatcher.validate_grammar_with_warnings(g, self.tokenizer)
        if is_error:
            what = {"json": "JSON schema", "json_object": "JSON schema", "regex": "regex",
                    "choice": "choice", "grammar": "grammar"}[key[0]]
            raise ValueError(f"structured_outputs: bad {what}: {msgs[0] if msgs else 'invalid'}")
        with self._lock:
            self.misses += 1
            self._cache[key] = g
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        return g

    def matcher(self, grammar: str) -> llguidance.LLMatcher:
        """A fresh matcher at the start of ``grammar`` (a string from ``compile``)."""
        m = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        if m.is_error():
            raise ValueError(f"structured_outputs: {m.get_error()}")
        return m


def make_ll_tokenizer(tokenizer_json: str, vocab_size: int, eos_token_ids: tuple[int, ...]
                      ) -> llguidance.LLTokenizer:
    """The llguidance tokenizer of a model (tokenizer.json text; the model's vocab size, which
    may exceed the tokenizer's: the extra ids are never allowed by a grammar)."""
    eos = list(eos_token_ids) if eos_token_ids else None
    try:
        return llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=eos)
    except Exception as e:  # noqa: BLE001 - the library raises plain exceptions
        raise ValueError(f"structured_outputs: the grammar engine cannot use this model's "
                         f"tokenizer: {e}") from None
