"""Speculative decoding benchmark: acceptance, mean accepted length and speed-up, same run.

For each workload and each k, one engine with ``speculative_config`` and one without (built
once) decode the same greedy requests; the table gives the acceptance rate (accepted / draft
tokens), the mean accepted length (tokens emitted per verify row = 1 + accepted / drafts),
batch-1 decode tok/s and its speed-up over the engine without speculation, and throughput at
``--concurrency`` requests at once with its ratio (the >= 0.95x target at high load, where
``disable_by_batch_size`` should switch speculation off). Not a test: numbers go to
benchmarks/RESULTS.md with the device and date.

Workloads (bundled ``code-small``, or ``--model``):
  code  code-completion prompts from the held-out 5% of the Python standard library (the split
        the bundled models never trained on: SHA-256 of the path, as tools/train_default_model.py)
  copy  "rewrite this function with type hints": the function, then its header again; the
        output copies the prompt (what prompt-lookup drafts are for)

    PYTHONPATH=. python benchmarks/spec_decode.py                      # n-gram, k = 2, 4, 6
    PYTHONPATH=. python benchmarks/spec_decode.py --ks 4 --concurrency 256 --num-prompts 256 \
        --disable-by-batch-size 32
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sysconfig
import time
from pathlib import Path

from jserve.builder import EngineArgs, build_engine
from jserve.sampling_params import SamplingParams

SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "lib2to3", "__pycache__"}


def held_out_files(stdlib: Path) -> list[tuple[str, str]]:
    out = []
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib).as_posix()
        if SKIP_DIRS & set(rel.split("/")[:-1]):
            continue
        if int.from_bytes(hashlib.sha256(rel.encode()).digest()[:8], "big") % 100 >= 5:
            continue
        try:
            out.append((rel, path.read_text(encoding="utf-8")))
        except (UnicodeDecodeError, OSError):
            continue
    return out


def _functions(text: str, min_lines: int = 4, max_lines: int = 30) -> list[tuple[int, str]]:
    """(start line, source) of top-level / method ``def`` blocks of a moderate length."""
    lines = text.splitlines(keepends=True)
    out = []
    for i, line in enumerate(lines):
        s = line.lstrip()
        if not s.startswith("def "):
            continue
        indent = len(line) - len(s)
        j = i + 1
        while j < len(lines) and (not lines[j].strip() or len(lines[j]) - len(lines[j].lstrip()) > indent):
            j += 1
        if min_lines <= j - i <= max_lines:
            out.append((i, "".join(lines[i:j])))
    return out


def prompts(workload: str, n: int, stdlib: Path, context_lines: int) -> list[str]:
    res = []
    for _, text in held_out_files(stdlib):
        lines = text.splitlines(keepends=True)
        for start, fn in _functions(text):
            if workload == "code":   # context before a def + its first line: complete the body
                head = "".join(lines[max(0, start - context_lines):start + 1])
                res.append(head)
            else:                    # copy: the function, then "again with type hints"
                header = fn.splitlines(keepends=True)[0]
                res.append(f"{fn}\n\n# The same function, rewritten with type hints:\n{header}")
            if len(res) >= n:
                return res
    return res


def _run(engine, items, concurrency: int) -> tuple[float, int, dict[str, int]]:
    """Greedy requests, ``concurrency`` at a time -> (seconds, output tokens, counter deltas)."""
    before = dict(engine.kv_cache_stats())
    t0 = time.perf_counter()
    tokens = 0
    pending = list(items)
    active = 0
    while pending or engine.has_unfinished_requests():
        while pending and active < concurrency:
            p, sp = pending.pop(0)
            engine.add_request(None, p, sp)
            active += 1
        for o in engine.step():
            if o.finished:
                active -= 1
                tokens += len(o.outputs[0].token_ids)
    dt = time.perf_counter() - t0
    after = engine.kv_cache_stats()
    return dt, tokens, {k: after[k] - before.get(k, 0) for k in after if k.startswith("spec_decode")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="target model (default: bundled code-small)")
    ap.add_argument("--method", default="ngram", choices=("ngram", "draft_model"))
    ap.add_argument("--draft-model", default="code-draft")
    ap.add_argument("--ks", default="2,4,6", help="num_speculative_tokens values")
    ap.add_argument("--workloads", default="code,copy")
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--context-lines", type=int, default=30)
    ap.add_argument("--concurrency", type=int, default=0, help="also run all prompts this many at a "
                    "time (0: batch 1 only)")
    ap.add_argument("--prompt-lookup-min", type=int, default=2)
    ap.add_argument("--prompt-lookup-max", type=int, default=5)
    ap.add_argument("--disable-by-batch-size", type=int, default=None)
    ap.add_argument("--max-num-seqs", type=int, default=None)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--stdlib", default=sysconfig.get_paths()["stdlib"])
    ap.add_argument("--json", default=None, help="also write the rows here")
    ns = ap.parse_args()

    seqs = ns.max_num_seqs or max(8, ns.concurrency)
    common = dict(model=ns.model, max_model_len=ns.max_model_len, max_num_seqs=seqs)

    def spec_cfg(k: int) -> dict:
        d = {"method": ns.method, "num_speculative_tokens": k}
        if ns.method == "ngram":
            d.update(prompt_lookup_min=ns.prompt_lookup_min, prompt_lookup_max=ns.prompt_lookup_max)
        else:
            d["model"] = ns.draft_model
        if ns.disable_by_batch_size is not None:
            d["disable_by_batch_size"] = ns.disable_by_batch_size
        return d

    ks = [int(k) for k in ns.ks.split(",")]
    engines = {0: build_engine(EngineArgs(**common))}
    for k in ks:
        engines[k] = build_engine(EngineArgs(**common, speculative_config=spec_cfg(k)))
    sp = SamplingParams(temperature=0.0, max_tokens=ns.max_tokens, ignore_eos=True)
    rows = []
    for workload in ns.workloads.split(","):
        ps = prompts(workload, ns.num_prompts, Path(ns.stdlib), ns.context_lines)
        items = [(p, sp) for p in ps]
        for eng in engines.values():     # warm-up: first-use costs out of the timings
            _run(eng, items[:1], 1)
        base = _run(engines[0], items, 1)
        base_n = _run(engines[0], items, ns.concurrency) if ns.concurrency else None
        for k in ks:
            dt, tok, c = _run(engines[k], items, 1)
            acc, drafted = c["spec_decode_num_accepted_tokens"], c["spec_decode_num_draft_tokens"]
            row = {"workload": workload, "method": ns.method, "k": k, "prompts": len(ps),
                   "acceptance": acc / max(1, drafted),
                   "mean_accepted_len": (c["spec_decode_num_emitted_tokens"]
                                         / max(1, c["spec_decode_num_drafts"])),
                   "tok_s_b1": tok / dt, "base_tok_s_b1": base[1] / base[0],
                   "speedup_b1": (tok / dt) / (base[1] / base[0])}
            if base_n is not None:
                dtn, tokn, _ = _run(engines[k], items, ns.concurrency)
                row.update(tok_s_bn=tokn / dtn, base_tok_s_bn=base_n[1] / base_n[0],
                           ratio_bn=(tokn / dtn) / (base_n[1] / base_n[0]))
            rows.append(row)
    hdr = f"{'workload':8} {'k':>2} {'accept':>7} {'mean len':>8} {'b1 tok/s':>9} {'base':>8} {'x':>5}"
    if ns.concurrency:
        hdr += f" {'bN tok/s':>9} {'base':>8} {'x':>5}"
    print(hdr)
    for r in rows:
        line = (f"{r['workload']:8} {r['k']:>2} {r['acceptance']:7.3f} {r['mean_accepted_len']:8.2f} "
                f"{r['tok_s_b1']:9.1f} {r['base_tok_s_b1']:8.1f} {r['speedup_b1']:5.2f}")
        if ns.concurrency:
            line += f" {r['tok_s_bn']:9.1f} {r['base_tok_s_bn']:8.1f} {r['ratio_bn']:5.2f}"
        print(line)
    if ns.json:
        Path(ns.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
