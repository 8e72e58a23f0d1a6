"""Accuracy of quantized weights and KV on the bundled code-small (CPU is fine): held-out
perplexity for bf16, int8, fp8 and fp8_w8a8 weights, int8 and fp8 with the lm_head quantized
too (``quantize_lm_head``; code-small ties it to the embedding: an 8-bit copy) (and, with
``--kv``, bf16 weights over a bf16 / fp8 / int8 KV pool, attention reading the windows back from
the pages), greedy agreement with bf16 over 64 tokens.

Held-out text and evaluation: tests/quant_eval.py (the model card's test split and windows).
Greedy prompts: the first ``--prompt-tokens`` tokens of each held-out file.

    PYTHONPATH=. python3 benchmarks/quant_accuracy.py [--max-tokens 32768] [--prompts 8] [--kv]

``--max-tokens 0`` evaluates the whole held-out split (143k tokens). Prints a table for
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import quant_eval as qe  # noqa: E402

METHODS = (None, "int8", "fp8", "fp8_w8a8", "int8+lm_head", "fp8+lm_head")   # (+lm_head: quantize_lm_head)
KV_DTYPES = ("bfloat16", "fp8", "int8")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--max-tokens", type=int, default=32768)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--kv", action="store_true", help="rows for the KV dtypes instead of the weights")
    a = p.parse_args()
    ids = qe.heldout_ids(a.max_tokens or None)
    from tokenizers import Tokenizer

    from jserve.builder import default_model_path

    tok = Tokenizer.from_file(str(default_model_path() / "tokenizer.json"))
    prompts = [tok.encode(f.read_text(encoding="utf-8")).ids[:a.prompt_tokens]
               for f in qe.heldout_files()[:a.prompts]]
    rows, base_tokens, base_ppl, base_top1 = [], None, None, None
    runs = [(None, kv) for kv in KV_DTYPES] if a.kv else [(m, None) for m in METHODS]
    for i, (method, kv) in enumerate(runs):
        t = time.perf_counter()
        cfg, params = qe.load(method)
        nll, top1 = qe.evaluate(cfg, params, ids, kv_dtype=kv)
        ppl = qe.perplexity(nll)
        tokens = [qe.greedy(cfg, params, pr, a.steps, kv_dtype=kv) for pr in prompts]
        if i == 0:
            base_tokens, base_ppl, base_top1 = tokens, ppl, top1
        top1_same = 100 * float((top1 == base_top1).mean())
        agree = [qe.agreement(x, y) for x, y in zip(tokens, base_tokens, strict=True)]
        same = sum(int(x == y) for xs, ys in zip(tokens, base_tokens, strict=True)
                   for x, y in zip(xs, ys, strict=True))
        name = f"{kv} KV" if a.kv else method or "bf16"
        rows.append((name, ppl, 100 * (ppl / base_ppl - 1), top1_same, agree, same))
        took = time.perf_counter() - t
        print(f"{name}: ppl {ppl:.4f} agree {agree} ({took:.0f} s)", flush=True)
    n = (len(ids) - 1) // qe.SEQ_LEN * qe.SEQ_LEN
    print(f"\ncode-small, held-out {n:,} tokens ({n // qe.SEQ_LEN} windows of {qe.SEQ_LEN}); greedy "
          f"{a.steps} tokens after {len(prompts)} prompts of {a.prompt_tokens} held-out tokens")
    print("| weights / KV | perplexity | vs bf16 | next-token argmax = bf16's (held-out) | greedy tokens "
          "equal to bf16 before the first difference (per prompt) | greedy positions equal |")
    print("|---|---|---|---|---|---|")
    total = len(prompts) * a.steps
    for name, ppl, d, top1, agree, same in rows:
        print(f"| {name} | {ppl:.3f} | {d:+.2f}% | {top1:.2f}% | {' '.join(map(str, agree))} "
              f"| {same}/{total} |")


if __name__ == "__main__":
    main()
