"""Train jserve's bundled default models (``code-small`` and its draft ``code-draft``).

Where it sits: offline tooling, never imported by jserve. It writes the HF-layout directories that
ship as package data in ``jserve/default_model/`` and are loaded by ``LLM()`` with no model argument
through the same ``checkpoints/`` path as any user model.

Corpus: the Python standard library sources of the interpreter running ``prepare`` (CPython 3.12.1
here), minus tests, site-packages and generated data tables. 5% of files (by a hash of the relative
path) are the held-out test split reported in the READMEs; another 3% are a validation split used
only to pick the best checkpoint. The byte-level BPE tokenizer (HF ``tokenizers``) is trained on the
training split only. Both models share it.

Steps (``prepare`` runs on any CPU in under a minute; ``train`` took 3.5 minutes for all four
runs on one H200, and would take hours on a CPU)::

    python tools/train_default_model.py prepare --data .train_data      # tokenizer + token arrays
    python tools/train_default_model.py train --data .train_data --out /tmp/dm   # both models
    python tools/train_default_model.py install --src /tmp/dm            # -> jserve/default_model/

Training: JAX + optax (``pip install -e .[train]``), AdamW with linear warm-up and cosine decay,
gradient clipping, bf16 matmuls over float32 master weights, fixed seeds (data order included: the
batch sampler is ``jax.random`` keyed by the step). The corpus is small (about 2M tokens), so each
model tries a few (steps, dropout) recipes and keeps the checkpoint with the lowest validation loss.
Weights are stored as bf16 safetensors (``safetensors.numpy``); the held-out figures are measured
with those bf16 weights.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
INSTALL_DIR = REPO / "jserve" / "default_model"
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__",
             "encodings",   # generated charmap tables
             "pydoc_data"}  # generated help text
TEST_PERCENT, VAL_PERCENT = 5, 3
VOCAB = 8192
SPECIALS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>"]
BOS, EOS, PAD = SPECIALS[0], SPECIALS[1], SPECIALS[2]
# Qwen2's pre-tokenizer split (digits alone, runs of whitespace kept whole) except that newlines
# never join the punctuation before them: a prompt ending in "):" then ends on a token boundary
# the model saw in training (with "):\n" merged, "):" alone would be a rare token).
SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
SEQ_LEN = 512


@dataclass(frozen=True)
class ModelSpec:
    """One model's architecture (HF Llama field names) and its training recipe."""

    name: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    recipes: tuple[tuple[int, float], ...]   # (steps, dropout) runs tried; best validation loss kept
    batch: int
    peak_lr: float
    warmup: int
    seed: int
    weight_decay: float = 0.1
    eval_every: int = 200

    def __post_init__(self) -> None:
        for steps, dropout in self.recipes:
            if steps % self.eval_every or not 0.0 <= dropout < 1.0:
                raise ValueError(f"{self.name}: recipe ({steps}, {dropout}) needs steps a multiple of "
                                 f"eval_every ({self.eval_every}) and dropout in [0, 1)")

    def num_params(self, vocab: int = VOCAB) -> int:
        h, d = self.hidden_size, self.head_dim
        attn = 2 * h * self.num_attention_heads * d + 2 * h * self.num_key_value_heads * d
        layer = attn + 3 * h * self.intermediate_size + 2 * h
        return self.num_hidden_layers * layer + vocab * h + h  # tied embeddings


SPECS = {
    "code-small": ModelSpec("code-small", hidden_size=256, num_hidden_layers=8, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=64, intermediate_size=768,
                            recipes=((1000, 0.0), (1600, 0.1), (2400, 0.2)),
                            batch=32, peak_lr=2e-3, warmup=200, seed=1),
    # The draft: code-small's widths, two layers (at batch 1 a draft's cost on a GPU is its kernel
    # count, so depth costs and width does not). The shipped one is cut from code-small's layers
    # 0 and 4 and distilled (tools/distill_draft.py --init-from-teacher 0,4), not trained here.
    "code-draft": ModelSpec("code-draft", hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=64, intermediate_size=768,
                            recipes=((3000, 0.0),),
                            batch=32, peak_lr=3e-3, warmup=200, seed=2),
}


def log(msg: str) -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------------------------------ corpus
def split_of(rel_path: str) -> str:
    """'test' (5%), 'val' (3%) or 'train', fixed by the SHA-256 of the path relative to the stdlib."""
    bucket = int.from_bytes(hashlib.sha256(rel_path.encode()).digest()[:8], "big") % 100
    return "test" if bucket < TEST_PERCENT else "val" if bucket < TEST_PERCENT + VAL_PERCENT else "train"


def collect_files(stdlib: Path) -> dict[str, list[tuple[str, str]]]:
    """{split: [(relative path, source text), ...]} in sorted path order."""
    out: dict[str, list[tuple[str, str]]] = {"train": [], "val": [], "test": []}
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib).as_posix()
        if SKIP_DIRS & set(rel.split("/")[:-1]):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            out[split_of(rel)].append((rel, text))
    return out


def train_tokenizer(texts: list[str]) -> Any:
    """Byte-level BPE (NFC, Qwen2 split, byte-level); ids 0..5 are SPECIALS, BOS added on encode."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))])
    for i, s in enumerate(SPECIALS):
        if tok.token_to_id(s) != i:
            raise RuntimeError(f"special token {s} got id {tok.token_to_id(s)}, want {i}")
    if tok.get_vocab_size() != VOCAB:
        raise RuntimeError(f"tokenizer vocab {tok.get_vocab_size()} != {VOCAB}")
    return tok


def write_tokenizer_files(tok_json: str, out: Path) -> None:
    (out / "tokenizer.json").write_text(tok_json, encoding="utf-8")
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
           "pad_token": PAD, "add_bos_token": True, "add_eos_token": False,
           "clean_up_tokenization_spaces": False, "model_max_length": SEQ_LEN,
           "chat_template": CHAT_TEMPLATE}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")


def cmd_prepare(ns: argparse.Namespace) -> None:
    stdlib = Path(ns.stdlib)
    data = Path(ns.data)
    data.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    files = collect_files(stdlib)
    tok = train_tokenizer([text for _, text in files["train"]])
    log(f"tokenizer trained in {time.perf_counter() - t0:.0f} s")
    meta: dict[str, Any] = {"stdlib": str(stdlib), "python": sys.version.split()[0], "vocab": VOCAB,
                            "skip_dirs": sorted(SKIP_DIRS), "splits": {}}
    for split, items in files.items():
        encs = tok.encode_batch([text for _, text in items])  # each starts with BOS
        ids = np.concatenate([np.asarray(e.ids + [1], np.uint16) for e in encs])
        np.save(data / f"{split}.npy", ids)
        nbytes = sum(len(text.encode()) for _, text in items)
        meta["splits"][split] = {"files": len(items), "bytes": nbytes, "tokens": int(ids.size),
                                 "paths": [rel for rel, _ in items] if split != "train" else None}
        log(f"{split}: {len(items)} files, {nbytes / 1e6:.2f} MB, {ids.size} tokens "
            f"({nbytes / ids.size:.2f} bytes/token)")
    write_tokenizer_files(tok.to_str(pretty=False), data)
    (data / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")


# ------------------------------------------------------------------------------------------- model
def init_params(spec: ModelSpec, seed: int) -> dict[str, Any]:
    """float32 params, ``[in, out]`` matrices (jserve's layout); residual outputs scaled down."""
    import jax
    import jax.numpy as jnp

    h, q, kv = spec.hidden_size, spec.num_attention_heads * spec.head_dim, \
        spec.num_key_value_heads * spec.head_dim
    std, out_std = 0.02, 0.02 / math.sqrt(2 * spec.num_hidden_layers)
    keys = iter(jax.random.split(jax.random.key(seed), 8 * spec.num_hidden_layers + 2))

    def normal(shape: tuple[int, ...], s: float = std) -> jax.Array:
        return jax.random.normal(next(keys), shape, jnp.float32) * s

    layers = [{"ln_attn": jnp.ones((h,)), "wq": normal((h, q)), "wk": normal((h, kv)),
               "wv": normal((h, kv)), "wo": normal((q, h), out_std), "ln_mlp": jnp.ones((h,)),
               "wg": normal((h, spec.intermediate_size)), "wu": normal((h, spec.intermediate_size)),
               "wd": normal((spec.intermediate_size, h), out_std)}
              for _ in range(spec.num_hidden_layers)]
    return {"embed": normal((VOCAB, h)), "norm": jnp.ones((h,)), "layers": layers}


def forward(spec: ModelSpec, params: dict[str, Any], tokens: Any, compute_dtype: Any,
            dropout: float = 0.0, key: Any = None) -> Any:
    """tokens: int32[B, T] -> float32 logits [B, T, V]. HF Llama semantics (rotate-half RoPE,
    theta 1e4, RMSNorm eps 1e-5 with float32 statistics, GQA, SiLU MLP, tied embeddings).
    Training only: ``dropout`` on the embeddings and each residual branch, keyed by ``key``."""
    import jax
    import jax.numpy as jnp

    p = jax.tree.map(lambda a: a.astype(compute_dtype), params)
    b, t = tokens.shape
    nq, nkv, d = spec.num_attention_heads, spec.num_key_value_heads, spec.head_dim

    def norm(x: Any, w: Any) -> Any:
        xf = x.astype(jnp.float32)
        return w * (xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + 1e-5)).astype(x.dtype)

    inv = 1.0 / (10000.0 ** (np.arange(0, d, 2, dtype=np.float32) / d))
    freqs = np.arange(t, dtype=np.float32)[:, None] * inv[None, :]
    cos, sin = jnp.asarray(np.cos(np.concatenate([freqs, freqs], -1))), \
        jnp.asarray(np.sin(np.concatenate([freqs, freqs], -1)))

    def rope(x: Any) -> Any:  # [B, T, heads..., d]
        xf = x.astype(jnp.float32)
        rot = jnp.concatenate([-xf[..., d // 2:], xf[..., :d // 2]], -1)
        shape = (1, t) + (1,) * (x.ndim - 3) + (d,)
        return (xf * cos.reshape(shape) + rot * sin.reshape(shape)).astype(x.dtype)

    def drop(x: Any, i: int) -> Any:
        if dropout == 0.0 or key is None:
            return x
        keep = jax.random.bernoulli(jax.random.fold_in(key, i), 1.0 - dropout, x.shape)
        return jnp.where(keep, x / (1.0 - dropout), 0).astype(x.dtype)

    mask = np.tril(np.ones((t, t), bool))
    x = drop(p["embed"][tokens], 0)
    for li, lp in enumerate(p["layers"]):
        hn = norm(x, lp["ln_attn"])
        qh = rope((hn @ lp["wq"]).reshape(b, t, nkv, nq // nkv, d))
        kh = rope((hn @ lp["wk"]).reshape(b, t, nkv, d))
        vh = (hn @ lp["wv"]).reshape(b, t, nkv, d)
        s = jnp.einsum("bqhgd,bkhd->bhgqk", qh, kh, preferred_element_type=jnp.float32) * d ** -0.5
        s = jnp.where(mask, s, -1e30)
        a = jax.nn.softmax(s, axis=-1).astype(compute_dtype)
        o = jnp.einsum("bhgqk,bkhd->bqhgd", a, vh).reshape(b, t, nq * d)
        x = x + drop(o @ lp["wo"], 2 * li + 1)
        hn = norm(x, lp["ln_mlp"])
        x = x + drop((jax.nn.silu(hn @ lp["wg"]) * (hn @ lp["wu"])) @ lp["wd"], 2 * li + 2)
    x = norm(x, p["norm"])
    return jnp.einsum("bth,vh->btv", x, p["embed"], preferred_element_type=jnp.float32)


def row_losses(spec: ModelSpec, params: dict[str, Any], seqs: Any, compute_dtype: Any,
               dropout: float = 0.0, key: Any = None) -> Any:
    """seqs: int32[B, T + 1] -> float32[B]: mean next-token loss of each row."""
    import jax.numpy as jnp
    import optax

    logits = forward(spec, params, seqs[:, :-1], compute_dtype, dropout, key)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, seqs[:, 1:]), axis=-1)


def eval_loss(spec: ModelSpec, params: dict[str, Any], ids: np.ndarray, batch: int) -> float:
    """Mean next-token loss over non-overlapping SEQ_LEN windows covering ``ids`` (the tail shorter
    than one window is dropped), bf16 matmuls as in training."""
    import jax
    import jax.numpy as jnp

    n = (ids.size - 1) // SEQ_LEN
    windows = ids[(np.arange(n) * SEQ_LEN)[:, None] + np.arange(SEQ_LEN + 1)].astype(np.int32)
    fn = jax.jit(lambda p, s: row_losses(spec, p, s, jnp.bfloat16))
    losses = []
    for i in range(0, n, batch):
        chunk = windows[i:i + batch]
        padded = np.pad(chunk, ((0, batch - chunk.shape[0]), (0, 0)))
        losses.append(np.asarray(fn(params, padded))[:chunk.shape[0]])
    return float(np.mean(np.concatenate(losses)))


# ---------------------------------------------------------------------------------------- training
def train_one(spec: ModelSpec, data: Path, steps: int, dropout: float, batch: int) -> tuple[dict, dict]:
    """One run of ``steps`` -> (bf16-rounded params of its best validation checkpoint, metrics)."""
    import jax
    import jax.numpy as jnp
    import optax

    train_ids = np.load(data / "train.npy").astype(np.int32)
    val_ids, test_ids = np.load(data / "val.npy"), np.load(data / "test.npy")
    doc_starts = np.flatnonzero(train_ids == 0).astype(np.int32)  # BOS opens every file
    dev_ids, dev_starts = jnp.asarray(train_ids), jnp.asarray(doc_starts)
    limit = train_ids.size - SEQ_LEN - 1

    sched = optax.warmup_cosine_decay_schedule(0.0, spec.peak_lr, min(spec.warmup, steps // 10), steps,
                                               end_value=spec.peak_lr * 0.05)
    decay_mask = lambda p: jax.tree.map(lambda a: a.ndim == 2, p)  # no decay on norms
    opt = optax.chain(optax.clip_by_global_norm(1.0),
                      optax.adamw(sched, b1=0.9, b2=0.95, weight_decay=spec.weight_decay,
                                  mask=decay_mask))
    params = init_params(spec, spec.seed)
    opt_state = opt.init(params)
    data_key, drop_key = jax.random.key(spec.seed + 1000), jax.random.key(spec.seed + 2000)

    def sample(step: Any) -> Any:
        """[batch, SEQ_LEN + 1] windows; a quarter start at a file's BOS (like a prompt does)."""
        k1, k2, k3 = jax.random.split(jax.random.fold_in(data_key, step), 3)
        anywhere = jax.random.randint(k1, (batch,), 0, limit)
        at_doc = jnp.minimum(dev_starts[jax.random.randint(k2, (batch,), 0, dev_starts.size)], limit)
        starts = jnp.where(jax.random.uniform(k3, (batch,)) < 0.25, at_doc, anywhere)
        return dev_ids[starts[:, None] + jnp.arange(SEQ_LEN + 1)[None, :]]

    def one_step(carry: Any, step: Any) -> Any:
        params, opt_state = carry
        key = jax.random.fold_in(drop_key, step)
        loss, grads = jax.value_and_grad(
            lambda p: jnp.mean(row_losses(spec, p, sample(step), jnp.bfloat16, dropout, key)))(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    chunk = min(spec.eval_every, steps)

    @jax.jit
    def run_steps(params: Any, opt_state: Any, first: Any) -> Any:
        (params, opt_state), losses = jax.lax.scan(one_step, (params, opt_state),
                                                   first + jnp.arange(chunk))
        return params, opt_state, jnp.mean(losses)

    as_bf16 = lambda p: jax.tree.map(lambda a: a.astype(jnp.bfloat16).astype(jnp.float32), p)
    best = (math.inf, 0, None)
    history = []
    t0 = time.perf_counter()
    for first in range(0, steps - steps % chunk, chunk):
        params, opt_state, train_loss = run_steps(params, opt_state, first)
        val = eval_loss(spec, as_bf16(params), val_ids, batch)
        done = first + chunk
        history.append({"step": done, "train_loss": round(float(train_loss), 4), "val_loss": round(val, 4)})
        log(f"{spec.name} (dropout {dropout}) step {done}: train {float(train_loss):.3f} val {val:.3f} "
            f"({time.perf_counter() - t0:.0f} s)")
        if val < best[0]:
            best = (val, done, jax.device_get(params))
    val, best_step, best_params = best
    shipped = as_bf16(best_params)
    test = eval_loss(spec, shipped, test_ids, batch)
    metrics = {"test_loss": round(test, 4), "test_perplexity": round(math.exp(test), 3),
               "val_loss": round(val, 4), "best_step": best_step, "steps": steps, "dropout": dropout,
               "batch": batch,
               "seq_len": SEQ_LEN, "tokens_seen": best_step * batch * SEQ_LEN,
               "train_tokens": int(train_ids.size), "test_tokens": int(test_ids.size),
               "params": spec.num_params(), "train_seconds": round(time.perf_counter() - t0, 1),
               "device": str(jax.devices()[0].device_kind), "history": history}
    log(f"{spec.name}: best step {best_step} val {val:.4f}; held-out test loss {test:.4f} "
        f"(perplexity {math.exp(test):.2f})")
    return jax.device_get(shipped), metrics


# ------------------------------------------------------------------------------------------ export
def hf_config(spec: ModelSpec) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
        "attention_dropout": 0.0, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2,
        "head_dim": spec.head_dim, "hidden_act": "silu", "hidden_size": spec.hidden_size,
        "initializer_range": 0.02, "intermediate_size": spec.intermediate_size,
        "max_position_embeddings": SEQ_LEN, "mlp_bias": False,
        "num_attention_heads": spec.num_attention_heads, "num_hidden_layers": spec.num_hidden_layers,
        "num_key_value_heads": spec.num_key_value_heads, "rms_norm_eps": 1e-5, "rope_scaling": None,
        "rope_theta": 10000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "use_cache": True, "vocab_size": VOCAB,
    }


def hf_tensors(params: dict[str, Any]) -> dict[str, np.ndarray]:
    """Our ``[in, out]`` tree -> HF names and ``[out, in]`` Linear layout, bf16."""
    import ml_dtypes

    bf = lambda a: np.ascontiguousarray(np.asarray(a, np.float32)).astype(ml_dtypes.bfloat16)
    out = {"model.embed_tokens.weight": bf(params["embed"]), "model.norm.weight": bf(params["norm"])}
    names = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj",
             "wo": "self_attn.o_proj", "wg": "mlp.gate_proj", "wu": "mlp.up_proj", "wd": "mlp.down_proj"}
    for i, lp in enumerate(params["layers"]):
        pre = f"model.layers.{i}."
        out[pre + "input_layernorm.weight"] = bf(lp["ln_attn"])
        out[pre + "post_attention_layernorm.weight"] = bf(lp["ln_mlp"])
        for ours, hf in names.items():
            out[pre + hf + ".weight"] = bf(np.asarray(lp[ours]).T)
    return out


def write_static_files(spec: ModelSpec, data: Path, out: Path) -> None:
    """config.json, generation_config.json and the tokenizer files (everything but the weights)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(hf_config(spec), indent=2) + "\n")
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}, indent=2) + "\n")
    shutil.copy(data / "tokenizer.json", out / "tokenizer.json")
    shutil.copy(data / "tokenizer_config.json", out / "tokenizer_config.json")


def write_weights(spec: ModelSpec, params: dict[str, Any], metrics: dict[str, Any], out: Path) -> None:
    from safetensors.numpy import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file(hf_tensors(params), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "training_metrics.json").write_text(json.dumps({"spec": asdict(spec), **metrics}, indent=1) + "\n")


def cmd_train(ns: argparse.Namespace) -> None:
    import jax

    data, out = Path(ns.data), Path(ns.out)
    log(f"jax {jax.__version__} on {jax.devices()}")
    for name in ns.models:
        spec = SPECS[name]
        recipes = [(ns.steps, 0.0)] if ns.steps else spec.recipes
        runs = [train_one(spec, data, steps, dropout, ns.batch or spec.batch) for steps, dropout in recipes]
        params, metrics = min(runs, key=lambda r: r[1]["val_loss"])
        metrics["runs_tried"] = [{k: r[1][k] for k in ("steps", "dropout", "best_step", "val_loss",
                                                        "test_loss")} for r in runs]
        write_weights(spec, params, metrics, out / name)
        if not ns.weights_only:
            write_static_files(spec, data, out / name)


def model_readme(spec: ModelSpec, metrics: dict[str, Any], meta: dict[str, Any]) -> str:
    """The model card: architecture, corpus, recipe and the held-out figures."""
    test = meta["splits"]["test"]
    bpb = metrics["test_loss"] * test["tokens"] / test["bytes"] / math.log(2)
    role = ("jserve's default model: `LLM()`, `jserve generate` and `jserve serve` load it when no "
            "model is given." if spec.name == "code-small" else
            "The draft model for speculative decoding with `code-small` (same tokenizer).")
    runs = "\n".join(f"| {r['steps']} | {r['dropout']} | {r['best_step']} | {r['val_loss']:.4f} | "
                      f"{r['test_loss']:.4f} |" for r in metrics["runs_tried"])
    return f"""# {spec.name}

{role}

A Llama-architecture (`LlamaForCausalLM`) Python code model trained from scratch by
`tools/train_default_model.py` on the Python {meta["python"]} standard library sources.

| | |
| --- | --- |
| parameters | {spec.num_params():,} (tied embeddings) |
| layers / hidden / MLP | {spec.num_hidden_layers} / {spec.hidden_size} / {spec.intermediate_size} |
| heads | {spec.num_attention_heads} query, {spec.num_key_value_heads} key/value, head_dim {spec.head_dim} |
| vocabulary | {VOCAB} (byte-level BPE, HF `tokenizers`) |
| context | {SEQ_LEN} tokens (`max_position_embeddings`), RoPE theta 10000 |
| weights | bf16 safetensors, {spec.num_params() * 2 / 1e6:.1f} MB |

## Held-out evaluation

Test split: {test["files"]} stdlib files ({test["bytes"]:,} bytes, {test["tokens"]:,} tokens), 5% of
files chosen by a hash of their path and never trained on or used for model selection. Mean
next-token cross-entropy over non-overlapping {SEQ_LEN}-token windows, with the bf16 weights as
shipped:

| held-out loss (nats/token) | perplexity | bits per byte (approx.) |
| --- | --- | --- |
| {metrics["test_loss"]:.4f} | {metrics["test_perplexity"]:.2f} | {bpb:.3f} |

## Training

AdamW (b1 0.9, b2 0.95, weight decay {spec.weight_decay}), peak learning rate {spec.peak_lr}, linear
warm-up then cosine decay, gradient clipping at 1.0, batch {metrics["batch"]} x {SEQ_LEN} tokens, bf16
matmuls over float32 master weights, seed {spec.seed}, on one {metrics["device"]}. The training split is
{metrics["train_tokens"]:,} tokens, so each recipe below ran for many epochs; the checkpoint with the
lowest validation loss (a separate 3% of files) is the one shipped.

| steps | dropout | best step | validation loss | held-out loss |
| --- | --- | --- | --- | --- |
{runs}

Per-step figures: `training_metrics.json`. Reproduce: see `tools/train_default_model.py`.
"""


def cmd_install(ns: argparse.Namespace) -> None:
    """Write each trained model's HF directory into jserve/default_model/<name>/: weights and
    metrics from ``--src``, config and tokenizer files from the spec and ``--data``."""
    src, data = Path(ns.src), Path(ns.data)
    for name, spec in SPECS.items():
        dst = INSTALL_DIR / name
        write_static_files(spec, data, dst)
        for f in ("model.safetensors", "training_metrics.json"):
            shutil.copyfile(src / name / f, dst / f)
        metrics = json.loads((dst / "training_metrics.json").read_text())
        meta = json.loads((data / "meta.json").read_text())
        (dst / "README.md").write_text(model_readme(spec, metrics, meta))
        log(f"installed {dst}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="train the tokenizer and write token arrays")
    p.add_argument("--stdlib", default=sysconfig.get_paths()["stdlib"])
    p.add_argument("--data", default=str(REPO / ".train_data"))
    p.set_defaults(func=cmd_prepare)
    t = sub.add_parser("train", help="train models (GPU: a few minutes) and write HF directories")
    t.add_argument("--data", default=str(REPO / ".train_data"))
    t.add_argument("--out", required=True)
    t.add_argument("--models", nargs="+", default=list(SPECS), choices=list(SPECS))
    t.add_argument("--steps", type=int, default=None, help="override (smoke tests)")
    t.add_argument("--batch", type=int, default=None, help="override (smoke tests)")
    t.add_argument("--weights-only", action="store_true",
                   help="write only model.safetensors and training_metrics.json per model")
    t.set_defaults(func=cmd_train)
    i = sub.add_parser("install", help="copy trained models into jserve/default_model/")
    i.add_argument("--src", required=True)
    i.add_argument("--data", default=str(REPO / ".train_data"))
    i.set_defaults(func=cmd_install)
    ns = parser.parse_args()
    ns.func(ns)


if __name__ == "__main__":
    main()
