"""Tokenizer: loading an HF directory, encode/decode, special tokens, chat templates, errors.

The tokenizer is a small byte-level BPE trained here with the `tokenizers` library (a few KB
of text with emoji and CJK), written out as an HF directory and loaded by Tokenizer.from_dir.
"""

import datetime
import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from jserve.tokenizer import ChatTemplateError, Tokenizer, validate_messages

SPECIALS = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "Hello world! The quick brown fox jumps over the lazy dog. ",
    "你好，世界。今天天气很好。我们去公园散步吧。",
    "Emoji: 😀🎉👍🏽 and ❤️ and 🇯🇵 flags, café naïve résumé — “quotes” €100",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
] * 20

CHATML = (
    "{{ bos_token }}\n"
    "{%- if tools %}\n"
    "<|im_start|>system\n"
    "Tools: {{ tools | tojson }}<|im_end|>\n"
    "{% endif %}\n"
    "{% for message in messages %}\n"
    "    {% if message.role not in ('system', 'user', 'assistant') %}\n"
    "        {{ raise_exception('Unknown role: ' + message.role) }}\n"
    "    {% endif %}\n"
    "<|im_start|>{{ message.role }}\n"
    "{{ message.content }}<|im_end|>\n"
    "{% endfor %}\n"
    "{% if add_generation_prompt %}\n"
    "<|im_start|>assistant\n"
    "{% endif %}\n"
)


def _train(bos_post_processor: bool) -> HFTokenizer:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    if bos_post_processor:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return tok


def write_model_dir(root: Path, config: dict | None = None, generation: dict | None = None,
                    bos_post_processor: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    _train(bos_post_processor).save(str(root / "tokenizer.json"))
    if config is not None:
        (root / "tokenizer_config.json").write_text(json.dumps(config))
    if generation is not None:
        (root / "generation_config.json").write_text(json.dumps(generation))
    return root


BASE_CONFIG = {
    "bos_token": "<s>",
    "eos_token": {"content": "<|im_end|>", "lstrip": False, "special": True, "__type": "AddedToken"},
    "pad_token": None,
    "chat_template": CHATML,
}


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    root = write_model_dir(tmp_path_factory.mktemp("model"), BASE_CONFIG, {"eos_token_id": [1, 3]})
    return Tokenizer.from_dir(root)


TEXTS = ["Hello world!", "你好，世界。", "Emoji 😀🎉👍🏽 mixed with 中文 and café", "", "  spaces\n\ttabs  ",
         "unseen: Ω≈ç√∫ 🦀 한국어"]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    with_bos = tok.encode(text)
    assert with_bos == [tok.bos_token_id, *ids]
    assert tok.decode(with_bos) == text
    assert tok.decode(with_bos, skip_special_tokens=False) == "<s>" + text


def test_special_ids_and_vocab(tok):
    assert tok.bos_token_id == 0
    assert tok.eos_token_ids == (3, 1)  # tokenizer_config's eos first, then generation_config's
    assert tok.vocab_size == 400
    assert set(tok.all_special_ids) == {0, 1, 2, 3}
    assert tok.id_to_token(3) == "<|im_end|>"
    assert tok.id_to_token(10_000) is None
    assert tok.has_chat_template


def test_decode_skips_special_tokens(tok):
    ids = [2, *tok.encode("assistant\nHi 😀", add_special_tokens=False), 3]
    assert tok.decode(ids) == "assistant\nHi 😀"
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>assistant\nHi 😀<|im_end|>"
    # ids past the tokenizer's vocab (a padded embedding table) decode to nothing
    assert tok.decode([*ids, 399 + 50], skip_special_tokens=True) == "assistant\nHi 😀"


@pytest.mark.parametrize("post_processor,add_bos,expect_bos", [
    (True, None, True), (True, True, True), (True, False, False),
    (False, None, False), (False, True, True), (False, False, False)])
def test_add_bos_token_exactly_once(tmp_path, post_processor, add_bos, expect_bos):
    cfg = {"bos_token": "<s>", "eos_token": "</s>"}
    if add_bos is not None:
        cfg["add_bos_token"] = add_bos
    t = Tokenizer.from_dir(write_model_dir(tmp_path, cfg, bos_post_processor=post_processor))
    body = t.encode("Hello", add_special_tokens=False)
    assert body[0] != 0
    assert t.encode("Hello") == ([0] if expect_bos else []) + body


def test_add_eos_token(tmp_path):
    cfg = {"bos_token": "<s>", "eos_token": "</s>", "add_eos_token": True}
    t = Tokenizer.from_dir(write_model_dir(tmp_path, cfg))
    body = t.encode("Hello", add_special_tokens=False)
    assert t.encode("Hello") == [0, *body, 1]
    assert t.eos_token_ids == (1,)


def test_generation_config_bos_and_single_eos(tmp_path):
    t = Tokenizer.from_dir(write_model_dir(tmp_path, None, {"bos_token_id": 0, "eos_token_id": 1},
                                           bos_post_processor=False))
    assert t.bos_token_id == 0 and t.eos_token_ids == (1,)
    assert not t.has_chat_template


# ---- loading errors ------------------------------------------------------------------------------

def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer directory not found"):
        Tokenizer.from_dir(tmp_path / "nope")


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_invalid_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"tokenizer\.json: invalid JSON"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "Nope"}}')
    with pytest.raises(ValueError, match=r"tokenizer\.json: not a valid tokenizers file"):
        Tokenizer.from_dir(tmp_path)


def test_invalid_config_files(tmp_path):
    root = write_model_dir(tmp_path, None)
    (root / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: invalid JSON"):
        Tokenizer.from_dir(root)
    (root / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: expected a JSON object"):
        Tokenizer.from_dir(root)
    (root / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<nope>"}))
    with pytest.raises(ValueError, match=r"bos_token '<nope>' is not in the vocabulary"):
        Tokenizer.from_dir(root)
    (root / "tokenizer_config.json").write_text(json.dumps({"eos_token": 5}))
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: 'eos_token' must be a string"):
        Tokenizer.from_dir(root)
    (root / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": "yes"}))
    with pytest.raises(ValueError, match=r"'add_bos_token' must be true or false"):
        Tokenizer.from_dir(root)
    (root / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True}))
    with pytest.raises(ValueError, match=r"add_bos_token is true but the model defines no bos_token"):
        Tokenizer.from_dir(root)
    (root / "tokenizer_config.json").write_text("{}")
    (root / "generation_config.json").write_text(json.dumps({"eos_token_id": ["x"]}))
    with pytest.raises(ValueError, match=r"generation_config\.json: 'eos_token_id' must be a token id"):
        Tokenizer.from_dir(root)


# ---- chat template -------------------------------------------------------------------------------

def test_chat_template_renders_like_hf(tok):
    messages = [{"role": "system", "content": "You are kind."}, {"role": "user", "content": "Hi 😀"}]
    assert tok.apply_chat_template(messages) == (
        "<s><|im_start|>system\nYou are kind.<|im_end|>\n"
        "<|im_start|>user\nHi 😀<|im_end|>\n"
        "<|im_start|>assistant\n")
    assert tok.apply_chat_template(messages, add_generation_prompt=False) == (
        "<s><|im_start|>system\nYou are kind.<|im_end|>\n"
        "<|im_start|>user\nHi 😀<|im_end|>\n")


def test_chat_template_tools_tojson_keeps_order_and_does_not_escape(tok):
    tools = [{"name": "météo", "description": "<city> & 'more'", "parameters": {"z": 1, "a": [True, None]}}]
    out = tok.apply_chat_template([{"role": "user", "content": "x"}], tools=tools)
    assert out == (
        '<s><|im_start|>system\nTools: [{"name": "météo", "description": "<city> & \'more\'", '
        '"parameters": {"z": 1, "a": [true, null]}}]<|im_end|>\n'
        "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n")


def test_chat_template_raise_exception_is_a_value_error(tok):
    with pytest.raises(ChatTemplateError, match="Unknown role: robot"):
        tok.apply_chat_template([{"role": "robot", "content": "beep"}])
    assert issubclass(ChatTemplateError, ValueError)


def test_chat_template_helpers_and_extensions(tok):
    render = lambda t, **kw: tok.apply_chat_template([{"role": "user", "content": "a"}],
                                                     chat_template=t, **kw)
    year = render("{{ strftime_now('%Y') }}")
    assert int(year) in {datetime.datetime.now().year, datetime.datetime.now().year - 1}
    assert render("{% for i in range(5) %}{% if i == 3 %}{% break %}{% endif %}{{ i }}{% endfor %}") == "012"
    assert render("{% generation %}{{ messages[0].content }}!{% endgeneration %}") == "a!"
    assert render("{{ eos_token }}|{{ enable_thinking }}", template_kwargs={"enable_thinking": False}) \
        == "<|im_end|>|False"
    with pytest.raises(ChatTemplateError, match="failed to render"):
        render("{{ messages[0].content.__class__.__mro__ }}{{ 1 / 0 }}")
    with pytest.raises(ValueError, match="syntax error"):
        render("{% if %}")


def test_missing_chat_template(tmp_path):
    t = Tokenizer.from_dir(write_model_dir(tmp_path, {"bos_token": "<s>", "eos_token": "</s>"}))
    with pytest.raises(ValueError, match="has no chat template"):
        t.apply_chat_template([{"role": "user", "content": "hi"}])


def test_chat_template_file_and_named_templates(tmp_path):
    cfg = {"bos_token": "<s>", "eos_token": "</s>", "chat_template": [
        {"name": "default", "template": "D{{ messages | length }}"},
        {"name": "tool_use", "template": "T{{ tools | length }}"}]}
    root = write_model_dir(tmp_path, cfg)
    t = Tokenizer.from_dir(root)
    msgs = [{"role": "user", "content": "hi"}]
    assert t.apply_chat_template(msgs) == "D1"
    assert t.apply_chat_template(msgs, tools=[{"name": "f"}]) == "T1"
    (root / "chat_template.jinja").write_text("J{{ messages[0].content }}")
    assert Tokenizer.from_dir(root).apply_chat_template(msgs) == "Jhi"
    (root / "chat_template.jinja").write_text("{% for %}")
    with pytest.raises(ValueError, match=r"chat_template\.jinja: chat template has a syntax error"):
        Tokenizer.from_dir(root).apply_chat_template(msgs)


@pytest.mark.parametrize("messages,match", [
    ("hi", "messages must be a list"),
    ([], "must not be empty"),
    ([{"role": "user", "content": "a"}, "b"], r"messages\[1\] must be a dict"),
    ([{"content": "a"}], r"messages\[0\]\.role must be a non-empty string"),
    ([{"role": 3, "content": "a"}], r"messages\[0\]\.role"),
    ([{"role": "user"}], r"messages\[0\] has no 'content'"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": 5}],
     r"messages\[1\]\.content must be a string"),
    ([{"role": "user", "content": None}], r"messages\[0\]\.content must be a string"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}],
     r"messages\[0\]\.content\[0\]"),
])
def test_bad_messages(tok, messages, match):
    with pytest.raises(ValueError, match=match):
        tok.apply_chat_template(messages)


def test_message_normalization():
    msgs = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}]
    out = validate_messages(msgs)
    assert out == [{"role": "user", "content": "a\nb"},
                   {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}]
    assert msgs[0]["content"] != "a\nb"  # the caller's dicts are not modified


def test_bad_tools(tok):
    with pytest.raises(ValueError, match="tools must be a list of dicts"):
        tok.apply_chat_template([{"role": "user", "content": "a"}], tools={"name": "f"})
