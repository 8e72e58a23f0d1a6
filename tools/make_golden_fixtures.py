"""Golden parity fixtures: tiny random-weight HF checkpoints plus outputs computed by HF transformers.

Where it sits: offline tooling, never imported by jserve. It writes ``tests/fixtures/golden/<name>/``
(``llama``, ``qwen2``, ``mistral``); jserve's parity tests load those directories with jserve's own
checkpoint loader / tokenizer / decoder and compare against ``reference.npz``
(float32 logits within 1e-4 relative, greedy tokens identical). torch is never a jserve dependency:
this script runs in its own Python 3.11 virtualenv outside the repo::

    /root/.pyenv/versions/3.11.7/bin/python3.11 -m venv /tmp/torchenv
    /tmp/torchenv/bin/pip install torch==2.13.0 transformers safetensors tokenizers numpy jinja2
    # (always pin torch==2.13.0: it is the local CPU wheel; plain `torch` pulls GBs of CUDA)
    cd /work/main && /tmp/torchenv/bin/python tools/make_golden_fixtures.py          # (re)write fixtures
    cd /work/main && /tmp/torchenv/bin/python tools/make_golden_fixtures.py --check  # reload + verify

Generated with transformers 5.23.0, tokenizers 0.23.3, torch 2.13.0+cpu. Everything is float32 on
CPU with one thread and fixed seeds, so a re-run rewrites byte-identical files. The tokenizer is a
byte-level BPE trained on the first ``CORPUS_BYTES`` of the sorted CPython 3.11.7 stdlib ``*.py``
files (the pyenv install named above), shared by all three models.

Each fixture directory holds: ``config.json``, ``generation_config.json``, ``tokenizer.json``,
``tokenizer_config.json`` (with a jinja2 ``chat_template``), the weights (``model.safetensors``, or
for llama two shards plus ``model.safetensors.index.json``) and ``reference.npz``:

- ``prompts`` int32 [3, max_len] (padded with -1), ``prompt_lens`` int32 [3]
- ``prompt_logits_<i>`` float32 [prompt_lens[i], vocab]: one full forward, no KV cache, eager attention
- ``greedy_<i>`` int32 [32]: ``generate(do_sample=False)`` with eos disabled (always 32 tokens)
- ``greedy_logits_<i>`` float32 [32, vocab]: the raw logits each greedy token was chosen from
- ``rope_inv_freq`` float32 [head_dim // 2]: the (scaled) RoPE inverse frequencies HF uses
- ``text_prompt`` str, ``text_prompt_ids`` int32: HF tokenizer(text) (adds ``<|bos|>``)
- ``chat_text`` str, ``chat_ids`` int32: ``apply_chat_template(CHAT, add_generation_prompt=True)``

config.json is written in the form the published checkpoints use (top-level ``rope_theta`` and
``rope_scaling``, ``torch_dtype``) rather than transformers 5's ``rope_parameters``; ``--check`` proves
HF reads it back into the very model that produced the references.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import io
import json
import math
import os
import shutil
import sys
import unicodedata
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

REPO = Path(__file__).resolve().parents[1]
OUT_DIR = REPO / "tests" / "fixtures" / "golden"
STDLIB_GLOB = "/root/.pyenv/versions/3.11.7/lib/python3.11/*.py"
CORPUS_BYTES = 300_000
VOCAB = 512
SPECIALS = ["<|bos|>", "<|eos|>", "<|user|>", "<|assistant|>", "<|system|>", "<|pad|>"]
BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
GREEDY_STEPS = 32
PROMPT_LENS = (5, 13, 29)
PROMPT_TEXTS = (
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "import os\nimport sys\n\nclass Config:\n    \"\"\"Settings read from the environment.\"\"\"\n",
    "for key, value in sorted(mapping.items()):\n    if value is None:\n        raise ValueError(key)\n"
    "    result.append((key, value))\nreturn result\n",
)
# "cafe\u0301" is not NFC: the tokenizer's NFC normalizer turns it into "café".
TEXT_PROMPT = "def grüße(naïve: str) -> str:\n\treturn f\"{naïve} — 日本語 🙂 cafe\u0301 x=12345\"  # ok?\r\n"
TOKENIZER_PROBES = ("12345 678", "don't  stop\n\n\n   x", "  leading", "a\tb\r\nc", "<|user|>hi<|eos|>",
                    "Hello WORLD 3.14e-10", "x" * 40)
CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Print 'héllo' in Python."},
    {"role": "assistant", "content": "print('héllo')"},
    {"role": "user", "content": "And twice?"},
]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
COMMON: dict[str, Any] = dict(
    vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, intermediate_size=128, rms_norm_eps=1e-5, initializer_range=0.1, hidden_act="silu",
    bos_token_id=0, eos_token_id=1, pad_token_id=5,
)
# Checks on greedy decoding that keep the fixtures useful: no immediate collapse, no near-ties.
MIN_DISTINCT_GREEDY = 10
MIN_TOP2_MARGIN = 2e-2


@dataclass(frozen=True)
class Spec:
    """One fixture: HF config class and kwargs, weight seed, and how the weights are saved."""

    name: str
    config_cls: type
    kwargs: dict[str, Any]
    seed: int
    num_shards: int = 1


# llama3 scaling at head_dim 16 / theta 5e5: the unscaled wavelengths are 6.3, 32.4, 167, ... tokens;
# original_max_position_embeddings 64 puts them in all three branches (keep < 16 <= smooth <= 64 < scale).
SPECS = (
    Spec("llama", LlamaConfig, dict(
        tie_word_embeddings=False, max_position_embeddings=512,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=64)),
        seed=1084, num_shards=2),
    Spec("qwen2", Qwen2Config, dict(
        tie_word_embeddings=True, max_position_embeddings=256, use_sliding_window=False,
        rope_parameters=dict(rope_type="default", rope_theta=1000000.0)), seed=2049),
    Spec("mistral", MistralConfig, dict(
        tie_word_embeddings=False, max_position_embeddings=256, sliding_window=8,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0)), seed=3011),
)


def log(msg: str) -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------------------- tokenizer
def train_tokenizer() -> Tokenizer:
    """Byte-level BPE over the sorted stdlib sources; ids 0..5 are the special tokens.

    The pipeline is Qwen2's (NFC, Qwen2 split regex, byte-level without regex), because transformers 5
    forces ``Qwen2Tokenizer`` -- which rebuilds exactly that pipeline -- for any ``qwen2`` model dir;
    with it, every fixture's ``AutoTokenizer`` and a plain ``tokenizers.Tokenizer`` agree.
    """
    text, total = [], 0
    for path in sorted(glob.glob(STDLIB_GLOB)):
        chunk = Path(path).read_text(encoding="utf-8")
        text.append(chunk)
        total += len(chunk.encode("utf-8"))
        if total >= CORPUS_BYTES:
            break
    corpus = "".join(text).encode("utf-8")[:CORPUS_BYTES].decode("utf-8", errors="ignore")
    lines = corpus.splitlines(keepends=True)
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(lines, trainer=trainer, length=len(lines))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))])
    if tok.get_vocab_size() != VOCAB:
        raise RuntimeError(f"tokenizer vocab {tok.get_vocab_size()} != {VOCAB}")
    for i, s in enumerate(SPECIALS):
        if tok.token_to_id(s) != i:
            raise RuntimeError(f"special token {s} got id {tok.token_to_id(s)}, want {i}")
    return tok


def save_tokenizer(tok: Tokenizer, out: Path) -> None:
    (out / "tokenizer.json").write_text(tok.to_str(pretty=True) + "\n", encoding="utf-8")
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
        "add_bos_token": True, "add_eos_token": False,
        "clean_up_tokenization_spaces": False, "model_max_length": 256,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n",
                                               encoding="utf-8")


def hf_tokenizer(tok: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   chat_template=CHAT_TEMPLATE, clean_up_tokenization_spaces=False)


def make_prompts(tok: Tokenizer) -> list[list[int]]:
    prompts = []
    for n, text in zip(PROMPT_LENS, PROMPT_TEXTS, strict=True):
        ids = tok.encode(text).ids  # starts with <|bos|> (post-processor)
        if len(ids) < n:
            raise RuntimeError(f"prompt text too short for {n} tokens: {len(ids)}")
        prompts.append(ids[:n])
    return prompts


# ------------------------------------------------------------------------------------------- model
def build_model(spec: Spec, **overrides: Any) -> torch.nn.Module:
    """The spec's model in float32, eager attention, every parameter drawn from the spec's seed."""
    cfg = spec.config_cls(**{**COMMON, **spec.kwargs, **overrides})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    gen = torch.Generator().manual_seed(spec.seed)
    std = COMMON["initializer_range"]
    # Logits std ~2.4 so greedy has clear winners. With tied embeddings a large embedding makes the
    # last token its own argmax (greedy repeats it), so those get small embeddings and a final-norm gain.
    tied = cfg.tie_word_embeddings
    emb_std, final_gain = (0.05, 6.0) if tied else (3 * std, 1.0)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if name == "model.norm.weight":
                p.copy_(final_gain * (1.0 + 0.2 * noise))
            elif name.endswith("norm.weight"):  # not all ones: a wrong/missing norm scale shows
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith(".bias"):  # not zero: a missing qkv bias shows
                p.copy_(std * noise)
            elif name.endswith("embed_tokens.weight") or name == "lm_head.weight":
                p.copy_(emb_std * noise)
            else:
                p.copy_(std * noise)
    model.generation_config = GenerationConfig(bos_token_id=COMMON["bos_token_id"],
                                               eos_token_id=COMMON["eos_token_id"],
                                               pad_token_id=COMMON["pad_token_id"])
    return model.eval()


@torch.no_grad()
def full_logits(model: torch.nn.Module, ids: list[int], **kw: Any) -> np.ndarray:
    """[len, vocab] logits of one forward over ``ids`` (no cache, all-ones mask)."""
    x = torch.tensor([ids], dtype=torch.long)
    out = model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False, **kw)
    return out.logits[0].float().numpy()


@torch.no_grad()
def greedy(model: torch.nn.Module, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """HF ``generate`` greedy with eos disabled -> (tokens int32[32], logits float32[32, vocab])."""
    x = torch.tensor([ids], dtype=torch.long)
    cfg = GenerationConfig(do_sample=False, max_new_tokens=GREEDY_STEPS, min_new_tokens=GREEDY_STEPS,
                           eos_token_id=None, pad_token_id=COMMON["pad_token_id"],
                           bos_token_id=COMMON["bos_token_id"], output_logits=True,
                           return_dict_in_generate=True)
    out = model.generate(x, attention_mask=torch.ones_like(x), generation_config=cfg)
    toks = out.sequences[0, len(ids):].numpy().astype(np.int32)
    logits = torch.stack(out.logits, 1)[0].float().numpy()
    if toks.shape != (GREEDY_STEPS,) or logits.shape != (GREEDY_STEPS, VOCAB):
        raise RuntimeError(f"generate returned {toks.shape} tokens / {logits.shape} logits")
    return toks, logits


def recompute_greedy(model: torch.nn.Module, ids: list[int]) -> np.ndarray:
    """Greedy by argmax over a fresh full forward each step (no KV cache, no logits processors)."""
    seq = list(ids)
    for _ in range(GREEDY_STEPS):
        seq.append(int(np.argmax(full_logits(model, seq)[-1])))
    return np.array(seq[len(ids):], dtype=np.int32)


def rope_inv_freq(model: torch.nn.Module) -> np.ndarray:
    return model.model.rotary_emb.inv_freq.float().numpy().copy()


def llama3_branches(inv_freq: np.ndarray, rp: dict[str, Any]) -> list[str]:
    """Which llama3 branch each frequency takes (by the unscaled wavelength)."""
    old, lo, hi = rp["original_max_position_embeddings"], rp["low_freq_factor"], rp["high_freq_factor"]
    out = []
    for f in inv_freq:
        wl = 2 * math.pi / f
        out.append("keep" if wl < old / hi else "scale" if wl > old / lo else "smooth")
    return out


# ------------------------------------------------------------------------------------------ saving
def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez_compressed, but with fixed zip timestamps so a re-run is byte-identical."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asarray(arrays[key]), allow_pickle=False)
            info = zipfile.ZipInfo(key + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, buf.getvalue())


def to_published_config(path: Path) -> dict[str, Any]:
    """Rewrite transformers-5 ``rope_parameters`` as top-level ``rope_theta`` / ``rope_scaling``."""
    cfg = json.loads(path.read_text())
    rp = dict(cfg.pop("rope_parameters"))
    cfg["rope_theta"] = rp.pop("rope_theta")
    cfg["rope_scaling"] = rp if rp.get("rope_type", "default") != "default" else None
    cfg["torch_dtype"] = cfg["dtype"]
    cfg.pop("transformers_version", None)
    cfg = dict(sorted(cfg.items()))
    path.write_text(json.dumps(cfg, indent=2) + "\n")
    return cfg


def save_checkpoint(model: torch.nn.Module, spec: Spec, out: Path) -> None:
    n_bytes = sum(p.numel() * 4 for p in model.state_dict().values())  # upper bound (tied counted twice)
    shard = n_bytes // spec.num_shards + 16_384 if spec.num_shards > 1 else "1GB"
    model.save_pretrained(out, max_shard_size=shard)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    index = out / "model.safetensors.index.json"
    if spec.num_shards == 1 and (shards != ["model.safetensors"] or index.exists()):
        raise RuntimeError(f"{spec.name}: expected a single model.safetensors, got {shards}")
    if spec.num_shards > 1 and (len(shards) != spec.num_shards or not index.exists()):
        raise RuntimeError(f"{spec.name}: expected {spec.num_shards} shards + index, got {shards}")
    gen = out / "generation_config.json"
    g = json.loads(gen.read_text())
    g.pop("transformers_version", None)
    gen.write_text(json.dumps(g, indent=2, sort_keys=True) + "\n")


# -------------------------------------------------------------------------------------- generation
def generate_fixture(spec: Spec, tok: Tokenizer, prompts: list[list[int]]) -> None:
    out = OUT_DIR / spec.name
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    model = build_model(spec)
    save_checkpoint(model, spec, out)
    cfg = to_published_config(out / "config.json")
    save_tokenizer(tok, out)
    hft = hf_tokenizer(tok)

    arrays: dict[str, np.ndarray] = {}
    lens = np.array([len(p) for p in prompts], dtype=np.int32)
    padded = np.full((len(prompts), int(lens.max())), -1, dtype=np.int32)
    for i, p in enumerate(prompts):
        padded[i, : len(p)] = p
    arrays["prompts"], arrays["prompt_lens"] = padded, lens
    arrays["rope_inv_freq"] = rope_inv_freq(model)
    min_margin = math.inf
    for i, p in enumerate(prompts):
        arrays[f"prompt_logits_{i}"] = full_logits(model, p)
        toks, logits = greedy(model, p)
        arrays[f"greedy_{i}"], arrays[f"greedy_logits_{i}"] = toks, logits
        again = recompute_greedy(model, p)
        if not np.array_equal(toks, again):
            raise RuntimeError(f"{spec.name} prompt {i}: generate() {toks} != no-cache argmax {again}")
        seq_logits = full_logits(model, p + toks.tolist())[len(p) - 1: -1]
        cache_err = float(np.abs(seq_logits - logits).max() / np.abs(logits).max())
        if cache_err > 1e-5:
            raise RuntimeError(f"{spec.name} prompt {i}: KV-cached logits differ from a full forward")
        top2 = np.sort(logits, axis=-1)[:, -2:]
        margin = float((top2[:, 1] - top2[:, 0]).min())
        min_margin = min(min_margin, margin)
        distinct = len(set(toks.tolist()))
        log(f"  [{spec.name}] prompt {i} len {len(p):2d}: greedy {toks.tolist()}")
        log(f"  [{spec.name}]   distinct={distinct} min top1-top2 margin={margin:.4f} cached-vs-full "
            f"rel err={cache_err:.1e} "
            f"logit std={arrays[f'prompt_logits_{i}'].std():.3f}")
        if distinct < MIN_DISTINCT_GREEDY or len(set(toks[:4].tolist())) == 1:
            raise RuntimeError(f"{spec.name} prompt {i}: greedy decoding collapses: {toks.tolist()}")
        if margin < MIN_TOP2_MARGIN:
            raise RuntimeError(f"{spec.name} prompt {i}: near-tie in greedy ({margin:.2e}); change the seed")
        if (toks < len(SPECIALS)).any():  # eos (or bos...) would make ignore_eos semantics matter
            raise RuntimeError(f"{spec.name} prompt {i}: greedy emits a special token; change the seed")
    log(f"  [{spec.name}] generate() == per-step no-cache argmax for all prompts; "
        f"min margin {min_margin:.4f}")

    arrays["text_prompt"] = np.array(TEXT_PROMPT)
    text_ids = hft(TEXT_PROMPT)["input_ids"]
    if hft.decode(text_ids, skip_special_tokens=True) != unicodedata.normalize("NFC", TEXT_PROMPT):
        raise RuntimeError("tokenizer does not round-trip the text prompt")
    arrays["text_prompt_ids"] = np.array(text_ids, dtype=np.int32)
    chat_text = hft.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    chat_ids = hft.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=False)
    arrays["chat_text"] = np.array(chat_text)
    arrays["chat_ids"] = np.array(chat_ids, dtype=np.int32)
    write_npz(out / "reference.npz", arrays)
    check_variants(spec, model, prompts, cfg)


def check_variants(spec: Spec, model: torch.nn.Module, prompts: list[list[int]], cfg: dict[str, Any]) -> None:
    """Prove the feature each fixture exists for is really applied by HF (sliding window / llama3)."""
    ref = [full_logits(model, p) for p in prompts]
    if spec.name == "mistral":
        window = cfg["sliding_window"]
        plain = build_model(spec, sliding_window=None)
        for i, p in enumerate(prompts):
            d = float(np.abs(full_logits(plain, p) - ref[i]).max())
            log(f"  [mistral] prompt {i} len {len(p):2d}: "
                f"max|logits(window={window}) - logits(no window)| = {d:.3e}")
            if len(p) <= window and d != 0.0:
                raise RuntimeError("sliding window changed logits of a prompt shorter than the window")
            if len(p) > window and d < 1e-3:
                raise RuntimeError("sliding window had no effect on a prompt longer than the window")
        # Pin the semantics: query i sees keys j with i - window < j <= i (window keys, self included).
        # Two layers -> the last position depends on exactly 2 * (window - 1) + 1 = 15 trailing tokens.
        p, n = prompts[-1], len(prompts[-1])
        field_ = 2 * (window - 1) + 1
        last = ref[-1][-1]
        for keep in (field_ + 1, field_, field_ - 1):
            tail = p[n - keep:]
            pos = torch.arange(n - keep, n)[None]
            d = float(np.abs(full_logits(model, tail, position_ids=pos)[-1] - last).max())
            log(f"  [mistral] last-position logits from only the last {keep} tokens (true positions): "
                f"max diff {d:.3e}")
            if (keep >= field_) != (d < 1e-4):
                raise RuntimeError(f"sliding window receptive field is not {field_} tokens (keep={keep})")
    if spec.name == "llama":
        rp = cfg["rope_scaling"]
        plain = build_model(spec, rope_parameters=dict(rope_type="default", rope_theta=cfg["rope_theta"]))
        base, scaled = rope_inv_freq(plain), rope_inv_freq(model)
        branches = llama3_branches(base, rp)
        log(f"  [llama] inv_freq unscaled: {np.array2string(base, precision=6)}")
        log(f"  [llama] inv_freq llama3  : {np.array2string(scaled, precision=6)}")
        log(f"  [llama] llama3 branch per frequency: {branches}")
        if set(branches) != {"keep", "smooth", "scale"}:
            raise RuntimeError(f"llama3 scaling does not exercise all three branches: {branches}")
        want = llama3_reference(base, rp)
        if not np.allclose(scaled, want, rtol=1e-6, atol=0):
            raise RuntimeError(f"HF llama3 inv_freq {scaled} != formula {want}")
        for i, p in enumerate(prompts):
            d = float(np.abs(full_logits(plain, p) - ref[i]).max())
            log(f"  [llama] prompt {i} len {len(p):2d}: max|logits(llama3) - logits(no scaling)| = {d:.3e}")
            if d < 1e-4:
                raise RuntimeError("llama3 rope scaling had no effect on the logits")


def llama3_reference(inv_freq: np.ndarray, rp: dict[str, Any]) -> np.ndarray:
    """The llama3 formula in numpy, independent of HF, to cross-check ``rotary_emb.inv_freq``."""
    old, lo, hi, factor = (rp["original_max_position_embeddings"], rp["low_freq_factor"],
                           rp["high_freq_factor"], rp["factor"])
    out = []
    for f in inv_freq.astype(np.float64):
        wl = 2 * math.pi / f
        if wl < old / hi:
            out.append(f)
        elif wl > old / lo:
            out.append(f / factor)
        else:
            s = (old / wl - lo) / (hi - lo)
            out.append((1 - s) * f / factor + s * f)
    return np.array(out, dtype=np.float32)


# ------------------------------------------------------------------------------------------- check
def check_fixtures() -> int:
    """Reload every fixture dir through the Auto* classes; the references must come back exactly."""
    failures = 0
    for spec in SPECS:
        d = OUT_DIR / spec.name
        model = AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager", dtype=torch.float32)
        model.eval()
        tok = AutoTokenizer.from_pretrained(d)
        ref = np.load(d / "reference.npz", allow_pickle=False)
        errs = []
        for i, n in enumerate(ref["prompt_lens"]):
            p = ref["prompts"][i, :n].tolist()
            got = full_logits(model, p)
            diff = float(np.abs(got - ref[f"prompt_logits_{i}"]).max())
            if diff > 1e-5:
                errs.append(f"prompt {i} logits differ by {diff:.2e}")
            toks, _ = greedy(model, p)
            if not np.array_equal(toks, ref[f"greedy_{i}"]):
                errs.append(f"prompt {i} greedy differs")
        if tok(str(ref["text_prompt"]))["input_ids"] != ref["text_prompt_ids"].tolist():
            errs.append("text_prompt_ids differ")
        raw = Tokenizer.from_file(str(d / "tokenizer.json"))
        for text in (*TOKENIZER_PROBES, *PROMPT_TEXTS, str(ref["text_prompt"])):
            if tok(text)["input_ids"] != raw.encode(text).ids:
                errs.append(f"AutoTokenizer and tokenizer.json disagree on {text!r}")
        chat = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
        if chat != str(ref["chat_text"]):
            errs.append("chat_text differs")
        if tok.bos_token_id != model.config.bos_token_id or tok.eos_token_id != model.config.eos_token_id:
            errs.append("tokenizer bos/eos ids differ from config.json")
        if not np.array_equal(rope_inv_freq(model), ref["rope_inv_freq"]):
            errs.append("rope_inv_freq differs")
        status = "OK" if not errs else "FAIL: " + "; ".join(errs)
        window = getattr(model.config, "sliding_window", None)
        log(f"{spec.name}: {type(model).__name__} + {type(tok).__name__}, "
            f"rope={model.config.rope_parameters}, sliding_window={window}, "
            f"tie={model.config.tie_word_embeddings} -> {status}")
        failures += bool(errs)
    return failures


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="only reload the fixtures with HF and verify")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.check:
        return 1 if check_fixtures() else 0
    tok = train_tokenizer()
    prompts = make_prompts(tok)
    log(f"tokenizer: vocab {tok.get_vocab_size()}, prompts of lengths {[len(p) for p in prompts]}")
    for spec in SPECS:
        log(f"== {spec.name}")
        generate_fixture(spec, tok, prompts)
    total = 0
    for f in sorted(OUT_DIR.rglob("*")):
        if f.is_file():
            total += f.stat().st_size
            digest = hashlib.sha256(f.read_bytes()).hexdigest()[:12]
            log(f"  {f.relative_to(OUT_DIR)}  {f.stat().st_size:8d}  {digest}")
    log(f"fixtures total {total / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
