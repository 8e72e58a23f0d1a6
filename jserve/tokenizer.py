"""Tokenizer: text <-> token ids and chat-template rendering for one HF model directory.

Where it sits: the front door and the back door of the data path. The engine encodes a prompt
(or renders ``messages`` through the chat template, then encodes) before a Request is built;
the detokenizer (jserve/detokenizer.py) turns sampled ids back into streamed text with
``decode``. Host only: wraps the Rust ``tokenizers`` library plus jinja2; no jax.

Files read from the model directory::

    tokenizer.json           required  the tokenizers pipeline (vocab, merges, post-processor)
    tokenizer_config.json    optional  bos/eos/unk/pad tokens, add_bos_token/add_eos_token,
                                       chat_template (a string or a list of named templates)
    chat_template.jinja      optional  overrides tokenizer_config.json's chat_template
    generation_config.json   optional  eos_token_id (an int or a list), bos_token_id

BOS handling: when tokenizer_config.json says ``add_bos_token`` (Llama/Mistral style) that
setting wins, and BOS is added exactly once whether or not tokenizer.json's post-processor
already adds it; when the key is absent the post-processor alone decides (Llama 3, Qwen2).
A rendered chat template usually contains the BOS text already, so encode its output with
``add_special_tokens=False`` (as vLLM does) to avoid a double BOS.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"

# tokenizer_config.json keys whose token strings are passed to chat templates (HF's special map).
_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                       "mask_token")


class ChatTemplateError(ValueError):
    """The chat template refused the conversation (``raise_exception``) or failed to render."""


def _read_json(path: Path, required: bool) -> dict[str, Any] | None:
    if not path.is_file():
        if required:
            raise FileNotFoundError(f"{path}: not found (a HF model directory needs {path.name})")
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: invalid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_text(value: Any, key: str, source: str) -> str | None:
    """tokenizer_config.json stores a token as "<s>" or as {"content": "<s>", ...} (AddedToken)."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"{source}: '{key}' must be a string or an object with a 'content' string, "
                     f"got {value!r}")


def _id_list(value: Any, key: str, source: str) -> list[int]:
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    for v in items:
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{source}: '{key}' must be a token id or a list of token ids, got {value!r}")
    return list(items)


def _optional_bool(cfg: Mapping[str, Any], key: str, source: str) -> bool | None:
    value = cfg.get(key)
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"{source}: '{key}' must be true or false, got {value!r}")
    return value


def _select_chat_templates(value: Any, source: str) -> dict[str, str]:
    """A chat_template entry is one string or a list of {"name", "template"} pairs."""
    if value is None:
        return {}
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list):
        out = {}
        for i, item in enumerate(value):
            if not (isinstance(item, dict) and isinstance(item.get("name"), str)
                    and isinstance(item.get("template"), str)):
                raise ValueError(f"{source}: chat_template[{i}] must be an object with 'name' and "
                                 f"'template' strings")
            out[item["name"]] = item["template"]
        return out
    raise ValueError(f"{source}: 'chat_template' must be a string or a list of named templates, "
                     f"got {type(value).__name__}")


class _GenerationTag(jinja2.ext.Extension):
    """HF's ``{% generation %}...{% endgeneration %}`` marks assistant spans; we just render them."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # HF replaces jinja's tojson: keys keep their order and nothing is HTML-escaped.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _compile_chat_template(template: str, source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"{source}: chat template has a syntax error at line {e.lineno}: {e.message}") from e


def _content_text(content: Any, where: str) -> str:
    """OpenAI content is a string or a list of {"type": "text", "text": ...} parts (joined by newlines)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            is_text = isinstance(part, dict) and part.get("type") == "text"
            if not (is_text and isinstance(part.get("text"), str)):
                raise ValueError(f"{where}.content[{j}] must be a {{'type': 'text', 'text': str}} part "
                                 f"(only text content is supported)")
            parts.append(part["text"])
        return "\n".join(parts)
    raise ValueError(f"{where}.content must be a string, got {type(content).__name__}")


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    """Check a chat conversation and return a normalized copy (content flattened to a string).

    Each message is a dict with a non-empty string 'role' and a string 'content' (a list of text
    parts is joined with newlines; None is allowed only for an assistant message carrying
    'tool_calls'). Other keys (name, tool_calls, tool_call_id, ...) pass through to the template.
    """
    if not isinstance(messages, list):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
    if not messages:
        raise ValueError("messages must not be empty")
    out = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise ValueError(f"{where} must be a dict with 'role' and 'content', got {type(msg).__name__}")
        role = msg.get("role")
        if not isinstance(role, str) or not role:
            raise ValueError(f"{where}.role must be a non-empty string, got {role!r}")
        if "content" not in msg:
            raise ValueError(f"{where} has no 'content'")
        content = msg["content"]
        if content is None and role == "assistant" and msg.get("tool_calls"):
            out.append(dict(msg))
            continue
        out.append({**msg, "content": _content_text(content, where)})
    return out


class Tokenizer:
    """One model's tokenizer: ``encode``/``decode`` plus its special tokens and chat template.

    Build with ``Tokenizer.from_dir(path)``; the constructor takes an already-built
    ``tokenizers.Tokenizer`` and the pieces of tokenizer_config.json already parsed.
    """

    def __init__(self, backend: tokenizers.Tokenizer, *, special_tokens: Mapping[str, str] | None = None,
                 extra_eos_token_ids: Sequence[int] = (), fallback_bos_token_id: int | None = None,
                 add_bos_token: bool | None = None, add_eos_token: bool | None = None,
                 chat_templates: Mapping[str, str] | None = None, source: str = "<tokenizer>") -> None:
        self._backend = backend
        self._source = source
        self._special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self._chat_templates = dict(chat_templates or {})
        self._compiled: dict[str, jinja2.Template] = {}

        self.bos_token_id = self._special_id("bos_token", fallback_bos_token_id)
        eos_id = self._special_id("eos_token", None)
        eos = ([eos_id] if eos_id is not None else []) + [int(t) for t in extra_eos_token_ids]
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(eos))

        # Does tokenizer.json's post-processor add BOS / EOS by itself? Probe once.
        probe_with = backend.encode("a", add_special_tokens=True).ids
        probe_without = backend.encode("a", add_special_tokens=False).ids
        self._backend_adds_bos = (self.bos_token_id is not None and probe_with[:1] == [self.bos_token_id]
                                  and probe_without[:1] != [self.bos_token_id])
        self._backend_adds_eos = (eos_id is not None and probe_with[-1:] == [eos_id]
                                  and probe_without[-1:] != [eos_id])
        self._add_bos = self._backend_adds_bos if add_bos_token is None else add_bos_token
        self._add_eos = self._backend_adds_eos if add_eos_token is None else add_eos_token
        if self._add_bos and self.bos_token_id is None:
            raise ValueError(f"{source}: add_bos_token is true but the model defines no bos_token")
        if self._add_eos and eos_id is None:
            raise ValueError(f"{source}: add_eos_token is true but the model defines no eos_token")
        self._eos_token_id = eos_id

        special = {i for i, tok in backend.get_added_tokens_decoder().items() if tok.special}
        special.update(i for i in (self.bos_token_id, eos_id) if i is not None)
        for key in ("unk_token", "pad_token"):
            tid = backend.token_to_id(self._special_tokens[key]) if key in self._special_tokens else None
            if tid is not None:
                special.add(tid)
        self.all_special_ids: tuple[int, ...] = tuple(sorted(special))

    def _special_id(self, key: str, fallback: int | None) -> int | None:
        text = self._special_tokens.get(key)
        if text is None:
            return fallback
        tid = self._backend.token_to_id(text)
        if tid is None:
            raise ValueError(f"{self._source}: {key} {text!r} is not in the vocabulary of {TOKENIZER_FILE}")
        return tid

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load tokenizer.json (+ tokenizer_config.json, chat_template.jinja, generation_config.json)."""
        root = Path(path)
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: tokenizer directory not found")
        tok_path = root / TOKENIZER_FILE
        if not tok_path.is_file():
            raise FileNotFoundError(f"{tok_path}: not found (a HF model directory needs {TOKENIZER_FILE})")
        try:
            backend = tokenizers.Tokenizer.from_file(str(tok_path))
        except Exception as e:  # the Rust loader raises a bare Exception on any error
            _read_json(tok_path, required=True)  # names a JSON syntax error precisely, if that is it
            raise ValueError(f"{tok_path}: not a valid tokenizers file: {e}") from e

        cfg_path = root / TOKENIZER_CONFIG_FILE
        cfg = _read_json(cfg_path, required=False) or {}
        special = {key: _token_text(cfg.get(key), key, str(cfg_path)) for key in _SPECIAL_TOKEN_KEYS}
        templates = _select_chat_templates(cfg.get("chat_template"), str(cfg_path))
        template_source = str(cfg_path)
        jinja_path = root / CHAT_TEMPLATE_FILE
        if jinja_path.is_file():
            templates["default"] = jinja_path.read_text(encoding="utf-8")
            template_source = str(jinja_path)

        gen_path = root / GENERATION_CONFIG_FILE
        gen = _read_json(gen_path, required=False) or {}
        gen_eos = _id_list(gen.get("eos_token_id"), "eos_token_id", str(gen_path))
        gen_bos = _id_list(gen.get("bos_token_id"), "bos_token_id", str(gen_path))

        return cls(backend, special_tokens=special, extra_eos_token_ids=gen_eos,
                   fallback_bos_token_id=gen_bos[0] if gen_bos else None,
                   add_bos_token=_optional_bool(cfg, "add_bos_token", str(cfg_path)),
                   add_eos_token=_optional_bool(cfg, "add_eos_token", str(cfg_path)),
                   chat_templates=templates, source=template_source if templates else str(root))

    # ---- ids <-> text ------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer knows (base vocab + added tokens). The model's embedding
        table may be larger (padded); ids past this decode to nothing."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    def to_json(self) -> str:
        """The tokenizers pipeline as tokenizer.json text (for the grammar engine's own wrap)."""
        return self._backend.to_str()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """text -> token ids; with ``add_special_tokens`` BOS/EOS are added as the model expects."""
        if not isinstance(text, str):
            raise ValueError(f"text to encode must be a string, got {type(text).__name__}")
        # encode_batch releases the GIL while the Rust side works (encode does not): a server
        # tokenizing a long prompt on a worker thread keeps its event loop running.
        ids = self._backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        if not add_special_tokens:
            return ids
        bos, eos = self.bos_token_id, self._eos_token_id
        if self._backend_adds_bos and not self._add_bos and ids[:1] == [bos]:
            ids = ids[1:]
        elif self._add_bos and not self._backend_adds_bos:
            ids = [bos, *ids]
        if self._backend_adds_eos and not self._add_eos and ids[-1:] == [eos]:
            ids = ids[:-1]
        elif self._add_eos and not self._backend_adds_eos:
            ids = [*ids, eos]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """token ids -> text. Ids outside the vocabulary decode to nothing."""
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary string of one id (e.g. 'Ġhello', '<0xE2>'), None when out of range."""
        return self._backend.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    # ---- chat template -----------------------------------------------------------------------

    @property
    def has_chat_template(self) -> bool:
        return bool(self._chat_templates)

    def _template(self, tools: Any, chat_template: str | None) -> jinja2.Template:
        if chat_template is not None:
            key, text, source = "<override>:" + chat_template, chat_template, "chat_template argument"
        else:
            if not self._chat_templates:
                raise ValueError(
                    f"{self._source}: this model has no chat template ({TOKENIZER_CONFIG_FILE} has no "
                    f"'chat_template' and there is no {CHAT_TEMPLATE_FILE}); pass chat_template= or use "
                    f"plain completions")
            name = "tool_use" if tools and "tool_use" in self._chat_templates else "default"
            if name not in self._chat_templates:
                raise ValueError(f"{self._source}: no 'default' chat template among "
                                 f"{sorted(self._chat_templates)}")
            key, text, source = name, self._chat_templates[name], self._source
        if key not in self._compiled:
            self._compiled[key] = _compile_chat_template(text, source)
        return self._compiled[key]

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None, *, chat_template: str | None = None,
                            template_kwargs: Mapping[str, Any] | None = None,
                            continue_final_message: bool = False) -> str:
        """Render a conversation to the prompt text the model was trained on (HF semantics).

        The template sees ``messages``, ``tools``, ``add_generation_prompt``, the special token
        strings (``bos_token``, ``eos_token``, ...), ``raise_exception``, ``strftime_now`` and a
        ``tojson`` filter that keeps key order and does not HTML-escape; blocks are trimmed
        (trim_blocks / lstrip_blocks). ``template_kwargs`` adds variables (e.g. enable_thinking).
        ``continue_final_message``: the prompt ends inside the last (assistant) message, so the
        model continues it (HF / vLLM semantics: the text after its content, the end-of-turn
        marker, is cut); it excludes ``add_generation_prompt``.
        Raises ValueError for bad messages, a missing template, or one that refuses the input.
        """
        msgs = validate_messages(messages)
        if continue_final_message:
            if add_generation_prompt:
                raise ValueError("continue_final_message and add_generation_prompt cannot both be true")
            if not msgs or msgs[-1].get("role") != "assistant" or not isinstance(
                    msgs[-1].get("content"), str) or not msgs[-1]["content"].strip():
                raise ValueError("continue_final_message needs a last message with role 'assistant' "
                                 "and non-empty text content")
        if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
            raise ValueError("tools must be a list of dicts (JSON schemas)")
        template = self._template(tools, chat_template)
        variables: dict[str, Any] = dict(self._special_tokens)
        variables.update(template_kwargs or {})
        variables.update(messages=msgs, tools=tools, add_generation_prompt=add_generation_prompt)
        try:
            text = template.render(**variables)
        except ChatTemplateError:
            raise
        except Exception as e:  # a template error on user data is bad input, not an engine fault
            raise ChatTemplateError(f"chat template failed to render: {type(e).__name__}: {e}") from e
        if continue_final_message:
            final = msgs[-1]["content"].strip()
            end = text.rfind(final)
            if end < 0:
                raise ChatTemplateError("continue_final_message: the chat template does not render the "
                                        "last message's text verbatim")
            text = text[:end + len(final)]
        return text
