"""IncrementalDetokenizer: streamed deltas equal the full decode and never split a character.

Two real tokenizers built here with the `tokenizers` library: a byte-level BPE (GPT-2 / Llama 3
/ Qwen style) trained on a few KB including emoji and CJK, and a SentencePiece-style BPE with
byte fallback (Llama 2 / Mistral style: ``<0xE2>`` tokens, "▁" spaces, leading-space strip).
"""

import random

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from jserve.detokenizer import IncrementalDetokenizer
from jserve.tokenizer import Tokenizer

CORPUS = [
    "Hello world! The quick brown fox jumps over the lazy dog. ",
    "你好，世界。今天天气很好。我们去公园散步吧。",
    "Emoji: 😀🎉👍🏽 and ❤️ and 🇯🇵 flags, café naïve résumé — “quotes” €100",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
] * 20
TEXT = "Hi 😀! 你好，世界 👍🏽 café €5 🇯🇵 — done 🦀"
SPECIALS = ["<s>", "</s>", "<|im_end|>"]


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=350, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return Tokenizer(tok, special_tokens={"bos_token": "<s>", "eos_token": "</s>"})


@pytest.fixture(scope="module")
def byte_fallback() -> Tokenizer:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    pieces = ["▁", *"abcdefghijklmnopqrstuvwxyzHW!,.", "▁H", "▁w", "el", "lo", "▁Hel", "▁Hello", "or", "ld",
              "▁world"]
    for p in pieces:
        vocab.setdefault(p, len(vocab))
    merges = [("▁", "H"), ("▁", "w"), ("e", "l"), ("l", "o"), ("▁H", "el"), ("▁Hel", "lo"), ("o", "r"),
              ("l", "d"), ("▁w", "or"), ("▁wor", "ld")]
    vocab.setdefault("▁wor", len(vocab))
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(["<s>", "</s>"])
    return Tokenizer(tok, special_tokens={"bos_token": "<s>", "eos_token": "</s>"})


def stream(det: IncrementalDetokenizer, ids: list[int], chunks: list[int] | None = None) -> list[str]:
    deltas, i = [], 0
    for n in chunks or [1] * len(ids):
        deltas.append(det.add(ids[i:i + n]))
        i += n
    assert i == len(ids)
    deltas.append(det.flush())
    return deltas


def test_byte_level_splits_characters(bpe):
    ids = bpe.encode(TEXT, add_special_tokens=False)
    assert bpe.decode(ids) == TEXT
    # The test is only meaningful if some characters really are split across tokens.
    assert any("\ufffd" in bpe.decode([t]) for t in ids)


@pytest.mark.parametrize("prompt", ["", "Hello", "你好"])
def test_stream_valid_text_never_emits_partial_characters(bpe, prompt):
    ids = bpe.encode(TEXT, add_special_tokens=False)
    det = IncrementalDetokenizer(bpe, bpe.encode(prompt, add_special_tokens=False))
    deltas = stream(det, ids)
    assert "".join(deltas) == TEXT
    assert not any("\ufffd" in d for d in deltas)
    assert "" in deltas[:-1]  # some text was held back mid-character
    assert deltas[-1] == ""   # nothing left over for flush with valid text


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("seed", range(6))
def test_random_ids_concatenate_to_full_decode(bpe, skip, seed):
    rng = random.Random(seed)
    ids = [rng.randrange(bpe.vocab_size) for _ in range(300)]
    chunks = []
    while sum(chunks) < len(ids):
        chunks.append(min(rng.choice([1, 1, 1, 2, 3, 7]), len(ids) - sum(chunks)))
    prompt = bpe.encode("Prompt: 你好 😀", add_special_tokens=False)
    det = IncrementalDetokenizer(bpe, prompt, skip_special_tokens=skip)
    assert "".join(stream(det, ids, chunks)) == bpe.decode(ids, skip_special_tokens=skip)
    assert det.num_output_tokens == len(ids)


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("seed", range(4))
def test_finish_equals_add_then_flush(bpe, byte_fallback, skip, seed):
    """``finish`` (one decode for the rest of a finished sequence) gives the text the streamed
    deltas give, after any number of streamed ids, on both tokenizers."""
    rng = random.Random(seed)
    fallback_text = byte_fallback.encode("Hello world, Hello 😀 world! " * 4, add_special_tokens=False)
    for tok, random_ids in ((bpe, True), (byte_fallback, False)):
        for prompt in ("", "Prompt: 你好 😀", "Hello world"):
            n = rng.choice([1, 5, 40, 200])
            # byte fallback: valid text (random byte tokens need not concatenate to the full decode)
            ids = ([rng.randrange(tok.vocab_size) for _ in range(n)] if random_ids
                   else fallback_text[:n])
            head = rng.randrange(len(ids) + 1)
            p = tok.encode(prompt, add_special_tokens=False)
            streamed = "".join(stream(IncrementalDetokenizer(tok, p, skip_special_tokens=skip), ids))
            det = IncrementalDetokenizer(tok, p, skip_special_tokens=skip)
            text = det.add(ids[:head]) + det.finish(ids[head:])
            assert text == streamed and det.num_output_tokens == len(ids) and det.flush() == ""
    valid = bpe.encode(TEXT, add_special_tokens=False)
    assert IncrementalDetokenizer(bpe, []).finish(valid) == TEXT


def test_special_tokens_skipped_or_kept(bpe):
    eos = bpe.eos_token_ids[0]
    ids = [*bpe.encode("ok 😀", add_special_tokens=False), eos]
    assert "".join(stream(IncrementalDetokenizer(bpe, [], True), ids)) == "ok 😀"
    assert "".join(stream(IncrementalDetokenizer(bpe, [], False), ids)) == "ok 😀</s>"


def test_character_split_around_skipped_special_token(bpe):
    # A skipped special token between the bytes of one character: the character still resolves.
    ids = bpe.encode("a😀b", add_special_tokens=False)
    split = next(i for i in range(1, len(ids)) if bpe.decode(ids[:i]).endswith("\ufffd"))
    ids = ids[:split] + [bpe.eos_token_ids[0]] * 3 + ids[split:]
    deltas = stream(IncrementalDetokenizer(bpe, []), ids)
    assert "".join(deltas) == "a😀b" and not any("\ufffd" in d for d in deltas)


def test_window_stays_bounded(bpe):
    """O(1) per token: every decode call sees a short window, however long the output."""
    sizes = []

    class Recording:
        def decode(self, ids, skip_special_tokens=True):
            sizes.append(len(ids))
            return bpe.decode(ids, skip_special_tokens)

    ids = bpe.encode(TEXT * 40, add_special_tokens=False) + [bpe.eos_token_ids[0]] * 100
    det = IncrementalDetokenizer(Recording(), bpe.encode("a prompt of some length " * 20))
    assert "".join(stream(det, ids)) == TEXT * 40
    assert len(ids) > 1000 and max(sizes) <= 70
    assert len(sizes) <= 2 * len(ids) + 2


def test_cut_character_released_by_flush_and_by_hold_limit(bpe):
    ids = bpe.encode("x😀", add_special_tokens=False)
    det = IncrementalDetokenizer(bpe, [])
    cut = ids[:-1]
    assert bpe.decode(cut).endswith("\ufffd")
    text = det.add(cut)
    tail = det.flush()
    assert text + tail == bpe.decode(cut) and tail.endswith("\ufffd")

    lone = bpe.token_to_id("Ģ")  # byte 0x80 alone: a continuation byte, never valid
    det = IncrementalDetokenizer(bpe, [], max_held_tokens=4, max_window_tokens=8)
    deltas = [det.add([lone]) for _ in range(10)]
    assert deltas[:3] == ["", "", ""] and deltas[3] == "\ufffd" * 4
    assert "".join(deltas) + det.flush() == "\ufffd" * 10


def test_prompt_ending_inside_a_character(bpe):
    ids = bpe.encode("ab😀cd", add_special_tokens=False)
    split = next(i for i in range(1, len(ids)) if bpe.decode(ids[:i]).endswith("\ufffd"))
    det = IncrementalDetokenizer(bpe, ids[:split])
    assert "".join(stream(det, ids[split:])) == bpe.decode(ids[split:])


def test_byte_fallback_tokenizer(byte_fallback):
    tok = byte_fallback
    text = "Hello world 😀 你好!"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert tok.id_to_token(ids[-2]).startswith("<0x")  # CJK went through byte fallback
    deltas = stream(IncrementalDetokenizer(tok, []), ids)
    assert "".join(deltas) == text and not any("\ufffd" in d for d in deltas)


def test_byte_fallback_keeps_leading_space_with_prompt_context(byte_fallback):
    tok = byte_fallback
    prompt = tok.encode("Hello", add_special_tokens=False)
    out = tok.encode("Hello world", add_special_tokens=False)[len(prompt):]
    assert tok.id_to_token(out[0]) == "▁world"
    assert tok.decode(out) == "world"  # decoded alone the decoder strips the space...
    assert "".join(stream(IncrementalDetokenizer(tok, prompt), out)) == " world"  # ...in context it is kept


def test_bad_arguments(bpe):
    with pytest.raises(ValueError, match="max_held_tokens"):
        IncrementalDetokenizer(bpe, [], max_held_tokens=0)
