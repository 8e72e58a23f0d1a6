"""The dense token automata of regular specs (jserve/structured/automaton.py), on the bundled
model's tokenizer: random walks validate, llguidance agrees, finite languages are exact, and the
specs it must leave to the host path come back None."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import jsonschema
import llguidance
import llguidance.numpy as llnp
import numpy as np
import pytest

from jserve.structured.automaton import (
    SUPPORTED_KEYWORDS,
    AutomatonCompiler,
    TokenAutomaton,
    _int_range,
    token_bytes,
)
from jserve.structured.grammar import StructuredOutputsParams, make_ll_tokenizer

TOKENIZER = Path(__file__).parents[2] / "jserve" / "default_model" / "code-small" / "tokenizer.json"
V_TOK, V = 8192, 8192 + 64          # the model's vocabulary is larger than the tokenizer's
EOS = (1,)

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "minLength": 1, "maxLength": 16},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "role": {"enum": ["admin", "user", "guest"]},
    "active": {"type": "boolean"},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3}},
    "required": ["name", "age", "role", "active", "tags"], "additionalProperties": False}
ENUMS = {"type": "object", "properties": {
    "kind": {"const": "point"},
    "level": {"enum": [1, 2.5, "high \"quoted\"", None, True, [1, "x"], {"a": 1}]},
    "unit": {"type": "string", "enum": ["m", "km"]}},
    "required": ["kind", "level", "unit"]}
ANY_OF = {"type": "object", "properties": {
    "v": {"anyOf": [{"type": "integer", "minimum": -5, "maximum": 5}, {"type": "string", "maxLength": 3},
                    {"type": "null"}, {"type": "number"}]},
    "w": {"type": ["string", "null", "boolean"], "maxLength": 2}},
    "required": ["v", "w"]}
ARRAYS = {"type": "object", "properties": {
    "flags": {"type": "array", "items": {"type": "boolean"}, "minItems": 2, "maxItems": 4},
    "names": {"type": "array", "items": {"type": "string", "minLength": 2, "maxLength": 3}, "minItems": 1}},
    "required": ["flags", "names"]}
PATTERNS = {"type": "object", "properties": {
    "code": {"type": "string", "pattern": "^[A-Z]{2}-\\d{2,3}$"},
    "word": {"type": "string", "pattern": "a|bc"},
    "any": {"type": "string", "pattern": "^x.{0,3}y$"},
    "not": {"type": "string", "pattern": "^[^a-z]{1,4}$"}},
    "required": ["code", "word", "any", "not"], "additionalProperties": False}
REFS = {"title": "refs", "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$defs": {"pt": {"type": "object", "description": "a point",
                         "properties": {"x": {"type": "number"},
                                        "y": {"type": "integer", "exclusiveMinimum": 0}},
                         "required": ["x", "y"]}},
        "definitions": {"name": {"type": "string", "maxLength": 4, "examples": ["ab"], "default": "a"}},
        "type": "object", "properties": {
            "a": {"$ref": "#/$defs/pt"},
            "b": {"allOf": [{"$ref": "#/$defs/pt"}], "$comment": "pydantic's field wrapper"},
            "c": {"$ref": "#/definitions/name"},
            "d": {"type": "integer", "maximum": -10}},
        "required": ["a", "d"]}


def key(**kw) -> tuple[str, str, bool]:
    return StructuredOutputsParams(**kw).key


@pytest.fixture(scope="module")
def ll() -> llguidance.LLTokenizer:
    return make_ll_tokenizer(TOKENIZER.read_text(), V, EOS)


@pytest.fixture(scope="module")
def tokens(ll) -> list[bytes | None]:
    return token_bytes(ll, V)


@pytest.fixture(scope="module")
def compiler(tokens) -> AutomatonCompiler:
    return AutomatonCompiler(tokens, EOS, V, 2000)


def check_table(a: TokenAutomaton, eos: tuple[int, ...]) -> None:
    """Every state allows something; eos ids are self-loops exactly in final states; done states
    allow nothing else; ids past the tokenizer are never allowed."""
    assert a.next.dtype == np.int16 and a.next.shape == (a.num_states, V) and a.done.shape == (a.num_states,)
    allowed = a.next >= 0
    assert allowed.any(1).all() and 0 <= a.initial < a.num_states
    final = allowed[:, eos[0]]
    assert (allowed[:, list(eos)] == final[:, None]).all()
    assert (a.next[final][:, list(eos)] == np.flatnonzero(final)[:, None]).all()
    others = np.delete(allowed, list(eos), axis=1)
    assert (a.done == (final & ~others.any(1))).all()
    assert not allowed[:, V_TOK:].any()


def walk(a: TokenAutomaton, tokens: list, rng: np.random.Generator, eos: tuple[int, ...] = EOS,
         p_stop: float = 0.3) -> tuple[list[int], str]:
    """A random token path from the start to an eos -> (tokens, their text)."""
    s, out = a.initial, []
    for _ in range(1000):
        row = a.next[s]
        if row[eos[0]] >= 0 and (a.done[s] or rng.random() < p_stop):
            return out, b"".join(tokens[t] for t in out).decode("utf-8")
        choices = np.setdiff1d(np.flatnonzero(row >= 0), eos)
        t = int(rng.choice(choices))
        out.append(t)
        s = int(row[t])
    raise AssertionError("walk too long")


def language(a: TokenAutomaton, tokens: list, eos: tuple[int, ...] = EOS, max_len: int = 40) -> set[str]:
    """All strings of a finite automaton."""
    found, stack = set(), [(a.initial, b"")]
    while stack:
        s, text = stack.pop()
        assert len(text) <= max_len, "infinite language?"
        row = a.next[s]
        if row[eos[0]] >= 0:
            found.add(text.decode("utf-8"))
        stack += [(int(row[t]), text + tokens[t]) for t in np.flatnonzero(row >= 0) if t not in eos]
    return found


@pytest.mark.parametrize("schema,walks,flexible", [
    (SCHEMA, 50, False), (SCHEMA, 10, True), (ENUMS, 20, False), (ANY_OF, 30, False),
    (ARRAYS, 20, False), (PATTERNS, 30, False), (REFS, 30, False)])
def test_random_walks_validate(compiler, tokens, schema, walks, flexible):
    a = compiler.compile(key(json=schema, whitespace_flexible=flexible))
    assert a is not None
    check_table(a, EOS)
    rng = np.random.default_rng(0)
    for _ in range(walks):
        _, text = walk(a, tokens, rng)
        jsonschema.validate(json.loads(text), schema)


def test_benchmark_schema_size(compiler):
    a = compiler.compile(key(json=SCHEMA))
    assert a.num_states < 1000 and a.done.sum() == 1


def test_allowed_tokens_within_llguidance(compiler, tokens, ll):
    """Along random walks, every token the automaton allows, llguidance's matcher allows too, but
    for one known difference: where the grammar forces bytes (a property name, the rest of an enum
    value, ``","`` after a full string), llguidance's mask keeps only the canonical tokenization of
    the forced bytes, and the automaton allows every split of them (which llguidance consumes)."""
    a = compiler.compile(key(json=SCHEMA))
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA),
                                                             overrides={"whitespace_flexible": False})
    rng, mask = np.random.default_rng(1), llnp.allocate_token_bitmask(1, V)
    shift = np.arange(32, dtype=np.uint32)
    splits = 0
    for _ in range(6):
        path, _ = walk(a, tokens, rng)
        m, s = llguidance.LLMatcher(ll, grammar, log_level=0), a.initial
        for t in path + [EOS[0]]:
            llnp.fill_next_token_bitmask(m, mask, 0)
            theirs = ((mask[0].view(np.uint32)[:, None] >> shift) & 1).reshape(-1)[:V].astype(bool)
            extra = np.flatnonzero((a.next[s] >= 0) & ~theirs)
            forced = m.compute_ff_bytes()
            assert all(forced.startswith(tokens[x]) for x in extra), [tokens[x] for x in extra[:10]]
            splits += len(extra)
            assert m.consume_token(t), (t, tokens[t])
            s = int(a.next[s, t])
        assert m.is_stopped() or m.is_accepting()
    assert splits > 0   # the difference is real (so the check above is not vacuous)


def test_regex_and_choice_languages(compiler, tokens):
    assert language(compiler.compile(key(regex="[a-c]{2}x")), tokens) == {
        x + y + "x" for x in "abc" for y in "abc"}
    assert language(compiler.compile(key(choice=["yes", "no", "a.b"])), tokens) == {"yes", "no", "a.b"}
    # outlines-core's DFA alone is leftmost-first ("a|ab" matches only "a"): whole languages here
    assert language(compiler.compile(key(choice=["a", "ab", "abc"])), tokens) == {"a", "ab", "abc"}
    assert language(compiler.compile(key(regex="1|12|(?:x|xy)z?")), tokens) == {
        "1", "12", "x", "xy", "xz", "xyz"}
    meta = ["a.b", "(x|y)", "1+1", "c*", "[z]", "#&-~^$", "back\\slash", "q?{2}", "ü é"]
    assert language(compiler.compile(key(choice=meta)), tokens) == set(meta)


def test_enum_const_pattern_items_exact(compiler, tokens):
    assert language(compiler.compile(key(json={"enum": ["a", 1, None, [True]]})), tokens) == {
        '"a"', "1", "null", "[true]"}
    assert language(compiler.compile(key(json={"const": {"k": "v"}})), tokens) == {'{"k":"v"}'}
    assert language(compiler.compile(key(json={"enum": [1, 12, 123]})), tokens) == {"1", "12", "123"}
    assert language(compiler.compile(key(json={"type": "string", "pattern": "a|bc"})), tokens) == {
        '"a"', '"bc"'}
    bools = {"[" + ",".join(c) + "]" for n in (2, 3) for c in itertools.product(["true", "false"], repeat=n)}
    arr = {"type": "array", "items": {"type": "boolean"}, "minItems": 2, "maxItems": 3}
    assert language(compiler.compile(key(json=arr)), tokens) == bools


@pytest.mark.parametrize("bounds,values", [
    ({"minimum": -15, "maximum": 123}, range(-15, 124)),
    ({"minimum": 0, "maximum": 120}, range(0, 121)),
    ({"exclusiveMinimum": -3.5, "exclusiveMaximum": 7}, range(-3, 7)),
    ({"minimum": 0.5, "maximum": 3.5}, range(1, 4)),
    ({"minimum": 7, "maximum": 7}, [7]),
    ({"minimum": -120, "maximum": -99}, range(-120, -98))])
def test_integer_bounds_exact(compiler, tokens, bounds, values):
    a = compiler.compile(key(json={"type": "integer", **bounds}))
    assert language(a, tokens) == {str(v) for v in values}


def test_integer_range_regex():
    ranges = [(0, 120), (-15, 123), (None, None), (5, None), (None, -3), (-100, -7), (0, 0), (-1, 1),
              (999, 1001), (None, 42), (-1001, None), (10, 99), (100, 999), (47, 5321)]
    for lo, hi in ranges:
        r = _int_range(lo, hi)
        for n in range(-1500, 6000):
            inside = (lo is None or n >= lo) and (hi is None or n <= hi)
            assert bool(re.fullmatch(r, str(n))) == inside, (lo, hi, n)
        assert not any(re.fullmatch(r, s) for s in ("-0", "01", "-01", "+1", ""))


def test_unbounded_integers_walk(compiler, tokens):
    schema = {"type": "array", "items": {"type": "integer", "minimum": 5}, "maxItems": 4}
    a, rng = compiler.compile(key(json=schema)), np.random.default_rng(2)
    for _ in range(30):
        _, text = walk(a, tokens, rng, p_stop=0.2)
        values = json.loads(text)
        assert all(v >= 5 for v in values) and text == json.dumps(values, separators=(",", ":"))


def test_several_eos_ids(tokens):
    a = AutomatonCompiler(tokens, (1, 3), V, 100).compile(key(regex="ab?"))
    check_table(a, (1, 3))
    assert language(a, tokens, (1, 3)) == {"a", "ab"}


@pytest.mark.parametrize("spec", [
    {"json_object": True}, {"grammar": "start: \"a\""},
    {"json": {"$defs": {"n": {"type": "object", "properties": {"next": {"$ref": "#/$defs/n"}}}},
              "$ref": "#/$defs/n"}},
    {"json": {"type": "object", "properties": {"self": {"$ref": "#"}}}},
    {"json": {"type": "integer", "multipleOf": 3}},
    {"json": {"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": True}},
    {"json": {"type": "object", "properties": {"a": {"type": "integer"}},
              "additionalProperties": {"type": "integer"}}},
    {"json": {"type": "object"}}, {"json": {"type": "array"}}, {"json": {}},
    {"json": {"oneOf": [{"type": "integer"}, {"type": "number"}]}},
    {"json": {"allOf": [{"type": "integer"}, {"type": "number"}]}},
    {"json": {"type": "number", "minimum": 0}},
    {"json": {"type": "string", "format": "date"}},
    {"json": {"type": "string", "pattern": "\\s+"}},
    {"json": {"type": "string", "pattern": "[ -~]+"}},
    {"json": {"type": "string", "pattern": "a)|(b"}},
    {"json": {"type": "string", "pattern": "^a+$", "maxLength": 3}},
    {"json": {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["b"]}},
    {"json": {"type": "object", "properties": {"a\"b": {"type": "integer"}}}},
    {"json": {"type": "integer", "minimum": 5, "maximum": 4}},
    {"json": {"type": "string", "maxLength": 2.5}},
    {"json": {"enum": [{"a.b": 1}]}},
    {"json": {"type": "string", "enum": ["a", 1]}},
    {"json": {"prefixItems": [{"type": "integer"}]}},
    {"regex": "("}, {"regex": "a{2,1}"}, {"regex": "a)|(b"}])
def test_left_to_the_host_path(compiler, spec):
    assert compiler.compile(key(**spec)) is None


def test_max_states(tokens, compiler):
    n = compiler.compile(key(json=SCHEMA)).num_states
    assert AutomatonCompiler(tokens, EOS, V, n).compile(key(json=SCHEMA)).num_states == n
    assert AutomatonCompiler(tokens, EOS, V, n - 1).compile(key(json=SCHEMA)) is None
    long_string = key(json={"type": "string", "maxLength": 100})
    assert AutomatonCompiler(tokens, EOS, V, 50).compile(long_string) is None


def test_annotations_change_nothing(compiler):
    bare = compiler.compile(key(json={"type": "object", "properties": {"a": {"type": "boolean"}}}))
    noted = compiler.compile(key(json={
        "$schema": "https://json-schema.org/draft/2020-12/schema", "$id": "https://x/y", "title": "t",
        "description": "d", "$comment": "c", "examples": [{"a": True}], "default": {},
        "type": "object", "properties": {"a": {"type": "boolean", "title": "a", "default": False}}}))
    assert (bare.next == noted.next).all() and bare.initial == noted.initial


def test_supported_keywords():
    assert SUPPORTED_KEYWORDS == {
        "type", "properties", "required", "additionalProperties", "enum", "const", "items", "minItems",
        "maxItems", "minLength", "maxLength", "pattern", "anyOf", "allOf", "$ref", "$defs", "definitions",
        "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
        "title", "description", "default", "examples", "$schema", "$id", "$comment"}


def test_cache(compiler):
    k = key(json=SCHEMA)
    assert compiler.compile(k) is compiler.compile(k)
    assert compiler.compile(key(json_object=True)) is None and compiler.compile(key(json_object=True)) is None


def test_no_eos_or_bad_limits(tokens):
    assert AutomatonCompiler(tokens, (), V, 100).compile(key(regex="ab")) is None   # nothing could end it
    with pytest.raises(ValueError):
        AutomatonCompiler(tokens, EOS, V, 40000)                                    # int16 local ids


# ---------------------------------------------------------------- canonical forced runs
def test_forced_runs_take_the_canonical_split_and_tokens_beyond_them():
    """A toy vocabulary: forced "abc" then "d" or "e"; the tokenizer splits "abc" as ab + c. At the
    start only "ab" (its canonical first token) and "abcd" (covering the run and more) remain."""
    toks = [None, b"a", b"b", b"c", b"ab", b"bc", b"abc", b"abcd", b"d", b"e"]
    split = {b"abc": [4, 3], b"c": [3], b"bc": [5]}
    comp = AutomatonCompiler(toks, (0,), len(toks), 64, tokenize=lambda b: split.get(b, [1]))
    a = comp.compile(key(regex="abc(d|e)"))
    start = np.flatnonzero(a.next[a.initial] >= 0).tolist()
    assert start == [4, 7]
    assert language(a, toks, eos=(0,)) == {"abcd", "abce"}
    raw = AutomatonCompiler(toks, (0,), len(toks), 64).compile(key(regex="abc(d|e)"))
    assert np.flatnonzero(raw.next[raw.initial] >= 0).tolist() == [1, 4, 6, 7]


def test_canonical_walks_validate_and_match_llguidance(tokens, ll):
    """With the tokenizer's canonical splits of forced text, the automaton allows nothing
    llguidance's mask refuses along random walks (the raw automaton allowed every split:
    ``test_allowed_tokens_within_llguidance``), and its walks still validate."""
    comp = AutomatonCompiler(tokens, EOS, V, 2000, tokenize=ll.tokenize_bytes)
    a = comp.compile(key(json=SCHEMA))
    check_table(a, EOS)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA),
                                                             overrides={"whitespace_flexible": False})
    rng, mask = np.random.default_rng(2), llnp.allocate_token_bitmask(1, V)
    shift = np.arange(32, dtype=np.uint32)
    for _ in range(8):
        path, text = walk(a, tokens, rng)
        jsonschema.validate(json.loads(text), SCHEMA)
        m, s = llguidance.LLMatcher(ll, grammar, log_level=0), a.initial
        for t in path + [EOS[0]]:
            llnp.fill_next_token_bitmask(m, mask, 0)
            theirs = ((mask[0].view(np.uint32)[:, None] >> shift) & 1).reshape(-1)[:V].astype(bool)
            extra = np.flatnonzero((a.next[s] >= 0) & ~theirs)
            assert not len(extra), [tokens[x] for x in extra[:10]]
            assert m.consume_token(t)
            s = int(a.next[s, t])
