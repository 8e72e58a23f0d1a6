"""Accuracy of quantized weights on the bundled code-small: held-out perplexity and greedy
agreement with the unquantized model (tests/unit/test_quantization.py, benchmarks/quant_accuracy.py).

Held-out text: the stdlib files that tools/train_default_model.py put in its test split (5% of
files by a SHA-256 of the path; never trained on). Perplexity is the mean next-token loss over
non-overlapping 512-token windows, as the model card reports it; greedy decoding runs the
model's own forward over a paged KV cache (prefill, then one token per step).
"""

from __future__ import annotations

import hashlib
import math
import sysconfig
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from checkpoints import HFModelDir
from jserve.builder import default_model_path
from jserve.config import ModelConfig
from jserve.kv_cache import allocate_kv_cache
from jserve.model.decoder import forward, hidden_states, logits_from_hidden
from jserve.model.params import load_params
from jserve.step_input import StepInput
from sharding import make_mesh

SEQ_LEN = 512
PAGE = 16
# tools/train_default_model.py's split rule (kept identical: the model card's figures use it).
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "encodings", "pydoc_data"}
TEST_PERCENT = 5


def heldout_files(stdlib: str | None = None) -> list[Path]:
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if SKIP_DIRS & set(rel.split("/")[:-1]):
            continue
        if int.from_bytes(hashlib.sha256(rel.encode()).digest()[:8], "big") % 100 >= TEST_PERCENT:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            out.append(path)
    return out


def heldout_ids(max_tokens: int | None = None) -> np.ndarray:
    """Held-out token ids: each file encoded (BOS first) then EOS, concatenated."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(default_model_path() / "tokenizer.json"))
    ids: list[int] = []
    for path in heldout_files():
        ids += tok.encode(path.read_text(encoding="utf-8")).ids + [1]
        if max_tokens is not None and len(ids) >= max_tokens + 1:
            break
    return np.asarray(ids if max_tokens is None else ids[:max_tokens + 1], np.int32)


def load(quantization: str | None, dtype: str | None = None, path: Path | None = None,
         mesh: jax.sharding.Mesh | None = None, lm_head: bool = False) -> tuple[ModelConfig, dict]:
    """``quantization``: a quantize-on-load method, or one with "+lm_head" (the lm_head too)."""
    if quantization is not None and quantization.endswith("+lm_head"):
        quantization, lm_head = quantization.removesuffix("+lm_head"), True
    mdir = HFModelDir(path or default_model_path())
    cfg = ModelConfig.from_hf_config(mdir.config, dtype=dtype)
    return cfg, load_params(mdir, cfg, mesh or make_mesh(1), quantization, lm_head)


def mean_nll(cfg: ModelConfig, params: dict, ids: np.ndarray, batch: int = 4) -> float:
    """Mean next-token cross-entropy (nats) over non-overlapping SEQ_LEN windows of ``ids``."""
    return evaluate(cfg, params, ids, batch)[0]


def evaluate(cfg: ModelConfig, params: dict, ids: np.ndarray, batch: int = 4,
             kv_dtype: str | None = None) -> tuple[float, np.ndarray]:
    """-> (mean next-token cross-entropy over non-overlapping SEQ_LEN windows of ``ids``, the
    model's argmax prediction at every evaluated position: teacher-forced top-1). ``kv_dtype``
    (fp8 / int8): attention reads the windows back from a quantized page pool (the paged path)
    instead of attending over the chunk's own K/V."""
    n = (len(ids) - 1) // SEQ_LEN
    windows = ids[(np.arange(n) * SEQ_LEN)[:, None] + np.arange(SEQ_LEN + 1)]
    pages = batch * SEQ_LEN // PAGE + 1
    kv = allocate_kv_cache(cfg, pages, PAGE, kv_dtype or cfg.dtype, make_mesh(1))

    @jax.jit
    def losses(params, kv, b: StepInput, targets):
        h, _ = hidden_states(cfg, params, kv, b, fresh_prefill=kv_dtype is None)
        logp = jax.nn.log_softmax(logits_from_hidden(cfg, params, h), axis=-1)
        return -jnp.take_along_axis(logp, targets[:, None], axis=-1)[:, 0], jnp.argmax(logp, axis=-1)

    total, count, preds = 0.0, 0, []
    for i in range(0, n, batch):
        w = windows[i:i + batch]
        b = StepInput.fresh_prompts([r[:-1] for r in w], batch * SEQ_LEN, batch, SEQ_LEN // PAGE, PAGE)
        targets = np.zeros(batch * SEQ_LEN, np.int32)
        targets[:len(w) * SEQ_LEN] = w[:, 1:].reshape(-1)
        nll, top1 = losses(params, kv, b, targets)
        nll = np.asarray(nll)[:len(w) * SEQ_LEN]
        preds.append(np.asarray(top1)[:len(w) * SEQ_LEN])
        total += float(nll.sum())
        count += nll.size
    return total / count, np.concatenate(preds)


def perplexity(nll: float) -> float:
    return math.exp(nll)


def greedy(cfg: ModelConfig, params: dict, prompt: list[int], steps: int,
           kv_dtype: str | None = None, mesh: jax.sharding.Mesh | None = None) -> list[int]:
    """Greedy continuation of ``prompt`` (``steps`` tokens) through the paged forward (on
    ``mesh``: tensor parallel when its tensor axis is > 1)."""
    total = len(prompt) + steps
    num_pages = -(-total // PAGE) + 1
    kv = allocate_kv_cache(cfg, num_pages, PAGE, kv_dtype or cfg.dtype, mesh or make_mesh(1))
    row = np.arange(1, num_pages, dtype=np.int32)[None]
    fwd = jax.jit(lambda p, k, b: forward(cfg, p, k, b, mesh=mesh), donate_argnums=1)

    def step(kv, ids, start):
        pos = np.arange(start, start + len(ids), dtype=np.int32)
        b = StepInput(token_ids=np.asarray(ids, np.int32), positions=pos,
                      slot_mapping=(row[0][pos // PAGE] * PAGE + pos % PAGE).astype(np.int32),
                      page_table=row, seq_lens=np.array([start + len(ids)], np.int32),
                      query_start_loc=np.array([0, len(ids)], np.int32), num_seqs=np.array([1], np.int32),
                      logits_indices=np.array([len(ids) - 1], np.int32))
        kv, logits = fwd(params, kv, b)
        return kv, int(np.argmax(np.asarray(logits)[0]))

    kv, tok = step(kv, prompt, 0)
    out = [tok]
    for i in range(steps - 1):
        kv, tok = step(kv, [tok], len(prompt) + i)
        out.append(tok)
    return out


def agreement(a: list[int], b: list[int]) -> int:
    """Tokens of ``a`` and ``b`` equal before the first difference."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


NEAR_TIE_NATS = 0.5


def diverges_only_at_near_tie(base, got: list[int], min_agree: int = 4) -> bool:
    """Greedy ``got`` against the unquantized ``base`` (a CompletionOutput with ``logprobs``, 5
    in the tests): true when both agree for ``min_agree`` tokens, or where they part first,
    ``got``'s token is among the base's listed candidates there and its base logprob is within
    ``NEAR_TIE_NATS`` of the base's best (a quantization error of the size the accuracy targets
    allow can reorder such near-equal candidates, two or more of them, and every later token
    then follows another text)."""
    n = agreement(base.token_ids, got)
    if n >= min(min_agree, len(base.token_ids), len(got)):
        return True
    cands = base.logprobs[n]
    best = max(lp.logprob for lp in cands.values())
    return got[n] in cands and best - cands[got[n]].logprob < NEAR_TIE_NATS


def prefill_logits(cfg: ModelConfig, params: dict, prompt: list[int],
                   mesh: jax.sharding.Mesh | None = None) -> np.ndarray:
    """The float32 logits of a prompt's last position, one fresh prefill through the paged
    forward (on ``mesh``: tensor parallel when its tensor axis is > 1)."""
    b = StepInput.fresh_prompts([np.asarray(prompt, np.int32)], len(prompt), 1, -(-len(prompt) // PAGE), PAGE)
    b = StepInput(**{**b.__dict__, "logits_indices": np.arange(len(prompt), dtype=np.int32)[-1:]})
    kv = allocate_kv_cache(cfg, -(-len(prompt) // PAGE) + 1, PAGE, cfg.dtype, mesh or make_mesh(1))
    h, _ = jax.jit(lambda p, k, b: hidden_states(cfg, p, k, b, mesh=mesh))(params, kv, b)
    return np.asarray(jax.jit(lambda p, h: logits_from_hidden(cfg, p, h, mesh))(params, h))
