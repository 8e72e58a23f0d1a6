"""Speculative decoding benchmark: acceptance, mean accepted length and speed-up, same run.

For each method (n-gram, draft model) and each k, an engine with ``speculative_config`` and one
without decode the same greedy requests. Two tables:

  per k     acceptance rate (accepted / draft tokens), mean accepted length (tokens emitted per
            verify row = 1 + accepted / drafts), batch-1 decode tok/s and its speed-up over the
            engine without speculation
  sweep     ``--concurrency 1,8,32,...``: output tok/s with speculation always on (no
            ``disable_by_batch_size``) against without, per concurrency; the last line per
            (method, k) suggests ``disable_by_batch_size``: the largest concurrency measured
            whose ratio is still >= 1 (above it speculation costs throughput)

Engines are built one at a time and freed (each takes its KV pool from the same device
memory). With ``--interleave`` they are built side by side instead and run in turn in each
round, one table of per-round ratios: the same engine's host speed moved 20-40% from build to
build on the H200 (session 25), which the one-at-a-time tables cannot tell from a real effect.
Not a test: numbers go to benchmarks/RESULTS.md with the device and date.

Workloads (bundled ``code-small``, or ``--model``):
  code  code-completion prompts from the held-out 5% of the Python standard library (the split
        the bundled models never trained on: SHA-256 of the path, as tools/train_default_model.py)
  copy  "rewrite this function with type hints": the function, then its header again; the
        output copies the prompt (what prompt-lookup drafts are for)

    PYTHONPATH=. python benchmarks/spec_decode.py                   # both methods, k = 2, 4, 6
    PYTHONPATH=. python benchmarks/spec_decode.py --methods draft_model --ks 4 \
        --concurrency 1,8,32,64,128,256 --num-prompts 256 --max-num-seqs 256
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import statistics
import sysconfig
import time
from pathlib import Path

from benchmarks.step_trace import StepTrace
from jserve.builder import EngineArgs, build_engine
from jserve.sampling_params import SamplingParams
from jserve.spec.config import DISABLE_BY_BATCH_SIZE
from jserve.staged_input import stage_inputs

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


def _run(engine, items, concurrency: int, outputs: list | None = None) -> tuple[float, int, dict[str, float]]:
    """Greedy requests, ``concurrency`` at a time -> (seconds, output tokens, counters): the spec
    counters' deltas, and ``decode_s`` / ``decode_tokens``: each request's time from its first
    output token to its last, and its tokens after the first, summed over requests (the decode
    rate, prefill and admission left out: at batch 1, 1 / the mean time per output token);
    ``outputs``: filled with each request's token ids, in the items' order."""
    before = dict(engine.kv_cache_stats())
    t0 = time.perf_counter()
    tokens = 0
    pending = list(enumerate(items))
    active = 0
    got: dict[int, list[int]] = {}
    ids: dict[str, int] = {}
    first: dict[str, float] = {}
    decode_s, decode_tokens = 0.0, 0
    while pending or engine.has_unfinished_requests():
        while pending and active < concurrency:
            i, (p, sp) = pending.pop(0)
            ids[engine.add_request(None, p, sp)] = i
            active += 1
        outs = engine.step()
        now = time.perf_counter()
        for o in outs:
            if o.outputs and o.outputs[0].token_ids:
                first.setdefault(o.request_id, now)
            if o.finished:
                active -= 1
                n = len(o.outputs[0].token_ids)
                tokens += n
                decode_s += now - first.get(o.request_id, now)
                decode_tokens += max(0, n - 1)
                got[ids[o.request_id]] = list(o.outputs[0].token_ids)
    dt = time.perf_counter() - t0
    if outputs is not None:
        outputs[:] = [got[i] for i in range(len(items))]
    after = engine.kv_cache_stats()
    counters: dict[str, float] = {k: after[k] - before.get(k, 0) for k in after
                                  if k.startswith("spec_decode")}
    counters.update(decode_s=decode_s, decode_tokens=decode_tokens)
    return dt, tokens, counters


def _decode_rate(run: tuple[float, int, dict[str, float]]) -> float:
    """A ``_run`` result -> its decode tok/s (tokens after each request's first, over the time
    from first to last)."""
    c = run[2]
    return c["decode_tokens"] / max(c["decode_s"], 1e-9)


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="target model (default: bundled code-small)")
    ap.add_argument("--methods", default="ngram,draft_model", help="comma list of ngram, draft_model")
    ap.add_argument("--draft-model", default="code-draft",
                    help="comma list of draft models (bundled names or paths): one engine each")
    ap.add_argument("--ks", default="2,4,6", help="num_speculative_tokens values")
    ap.add_argument("--workloads", default="code,copy")
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--context-lines", type=int, default=30)
    ap.add_argument("--concurrency", default="", help="comma list: also run the prompts this many "
                    "at a time (speculation always on), e.g. 1,8,32,64,128,256 (empty: batch 1 only)")
    ap.add_argument("--sweep-workload", default="code", help="the workload of the concurrency sweep")
    ap.add_argument("--prompt-lookup-min", type=int, default=2)
    ap.add_argument("--prompt-lookup-max", type=int, default=5)
    ap.add_argument("--max-num-seqs", type=int, default=None, help="default: max(8, largest concurrency)")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--gpu-memory-utilization", type=float, default=None,
                    help="the engines' memory share (default: the engine's)")
    ap.add_argument("--max-num-batched-tokens", type=int, default=None,
                    help="the step budget (default: the engine's; smaller: fewer buckets to compile)")
    ap.add_argument("--repeat", type=int, default=2,
                    help="runs per measured point; the median-speed run is reported (of two: the faster)")
    ap.add_argument("--disable-by-batch-size", default="none",
                    help="speculative_config.disable_by_batch_size of every speculating engine: N, "
                    "'none' (speculation always on) or 'default' (the engine's default)")
    ap.add_argument("--staged", action="store_true",
                    help="every engine copies its step inputs into fixed device buffers "
                    "(staged_input.stage_inputs)")
    ap.add_argument("--base-last", action="store_true",
                    help="build the engine without speculation after the speculating ones (an "
                         "A/B of the order: each engine is built in the same process)")
    ap.add_argument("--base-twice", action="store_true",
                    help="build the engine without speculation before and after the speculating "
                         "ones; every ratio takes the faster of the two measurements (the order "
                         "moved a same-call ratio by 10%% in session 23)")
    ap.add_argument("--interleave", action="store_true",
                    help="build the engine without speculation and the speculating ones "
                         "side by side (--gpu-memory-utilization: each engine's share; their sum "
                         "must stay under 0.9) and run them in turn "
                         "in each of --repeat rounds (batch 1, then each --concurrency): each round's "
                         "ratio compares runs seconds apart, so a slow build or a slow minute of the "
                         "machine shows as such")
    ap.add_argument("--trace", action="store_true",
                    help="print where each engine's step time goes at each sweep point "
                         "(benchmarks/step_trace.py)")
    ap.add_argument("--sync-too", action="store_true",
                    help="also time batch 1 of each speculative engine with the synchronous loop "
                         "(a draft model's only loop before chained rows, session 13)")
    ap.add_argument("--stdlib", default=sysconfig.get_paths()["stdlib"])
    ap.add_argument("--json", default=None, help="also write the rows here")
    ns = ap.parse_args()
    if ns.repeat < 1:
        ap.error(f"--repeat must be >= 1, got {ns.repeat}")
    for m in ns.methods.split(","):
        if m not in ("ngram", "draft_model"):
            ap.error(f"--methods: unknown method {m!r} (ngram, draft_model)")
    if ns.concurrency and ns.sweep_workload not in ns.workloads.split(","):
        ap.error(f"--sweep-workload {ns.sweep_workload!r} is not one of --workloads {ns.workloads!r}")
    return ns


def _median_run(engine, items, concurrency: int, repeat: int, outputs: list | None = None
                ) -> tuple[float, int, dict[str, int]]:
    """``items`` at ``concurrency``, ``repeat`` times -> the run of median speed (the faster of
    two: a process's first timed run was ~30% slower on CPU, which would charge whichever
    configuration happened to run first; single runs of ~1 s disagreed by up to 1.5x on the
    H200, RESULTS.md session 14)."""
    runs = [_run(engine, items, concurrency, outputs if i == 0 else None) for i in range(repeat)]
    runs.sort(key=lambda r: r[1] / r[0])
    return runs[len(runs) // 2]


def _measure(engine, workloads: dict[str, list], sweep: list[int], sweep_workload: str,
             sweep_items: list, repeat: int, trace: StepTrace | None = None) -> dict:
    """One engine over every workload at batch 1, and the sweep workload at each concurrency
    (``sweep_items``: the sweep workload's prompts, 2 x the largest concurrency), each point
    ``repeat`` times (``_median_run``); ``trace``: attached to the engine, its table of each
    sweep point's runs under "traces"
    -> {"b1": {workload: (s, tokens, counters)}, "sweep": {c: (s, tokens, counters)}, ...}."""
    for items in workloads.values():   # warm-up: first-use costs out of the timings
        _run(engine, items[:1], 1)
    tokens: dict[str, list] = {w: [] for w in workloads}
    out = {"b1": {w: _median_run(engine, items, 1, repeat, tokens[w]) for w, items in workloads.items()},
           "sweep": {}, "tokens": tokens, "traces": {}}
    for c in sweep:   # two waves of c requests (at least --num-prompts)
        items = sweep_items[:max(2 * c, len(workloads[sweep_workload]))]
        if trace is not None:
            trace.reset()
        out["sweep"][c] = _median_run(engine, items, c, repeat)
        if trace is not None:
            out["traces"][c] = trace.table(f"concurrency {c}, all {repeat} runs")
    return out


def _rates(c: dict[str, int]) -> tuple[float, float]:
    acc, drafted = c.get("spec_decode_num_accepted_tokens", 0), c.get("spec_decode_num_draft_tokens", 0)
    return acc / max(1, drafted), c.get("spec_decode_num_emitted_tokens", 0) / max(1, c.get(
        "spec_decode_num_drafts", 0))


def _faster(first: dict, last: dict) -> dict:
    """Two measurements of the engine without speculation -> per point the faster one (batch 1
    per workload, each sweep concurrency); prints both."""
    out = dict(first)
    for table in ("b1", "sweep"):
        out[table] = {}
        for key, a in first.get(table, {}).items():
            b = last[table][key]
            print(f"base {table} {key}: {a[1] / a[0]:.1f} tok/s built first, {b[1] / b[0]:.1f} built last")
            out[table][key] = a if a[1] / a[0] >= b[1] / b[0] else b
    return out


def _interleaved(ns: argparse.Namespace, common: dict, loads: dict[str, list], specs: dict,
                 sweep: dict[int, list]) -> None:
    """``--interleave``: every engine alive at once, run in turn in each round at batch 1 (each
    workload) and at each sweep concurrency (``sweep``: concurrency -> its requests); prints per
    round each engine's tok/s and each speculating engine's ratio to the base, then medians."""
    os.environ.setdefault("XLA_CLIENT_MEM_FRACTION", "0.9")   # room for all (device_memory.py)
    share = common.get("gpu_memory_utilization")

    def args(i: int, cfg: dict | None) -> EngineArgs:
        # An engine's budget counts what the device already holds (builder.memory_budget): the
        # i-th engine's share is i + 1 engines' worth.
        over = {} if share is None else {"gpu_memory_utilization": share * (i + 1)}
        return EngineArgs(**{**common, **over}, speculative_config=cfg)

    engines = {"base": build_engine(args(0, None))}
    for i, ((m, k), cfg) in enumerate(specs.items(), start=1):
        engines[f"{m} k={k}"] = build_engine(args(i, cfg))
    for eng in engines.values():   # warm-up: first-use costs out of the timings
        for items in loads.values():
            _run(eng, items[:1], 1)
    names = list(engines)
    print(f"{'round':>5} {'workload':8} " + " ".join(f"{n:>18}" for n in names) + "  ratios to base")
    points = [(w, 1, items) for w, items in loads.items()]
    points += [(f"c={c}", c, items) for c, items in sweep.items()]
    ratios: dict[tuple[str, str], list[float]] = {(n, p[0] + d): [] for n in names[1:] for p in points
                                                  for d in ("", " decode")}
    counts: dict[tuple[str, str], dict[str, float]] = {}
    for r in range(ns.repeat):
        for label, conc, items in points:
            rate, dec = {}, {}
            for n, eng in engines.items():
                run = _run(eng, items, conc)
                rate[n], dec[n] = run[1] / run[0], _decode_rate(run)
                acc = counts.setdefault((n, label), {})
                for key, v in run[2].items():
                    acc[key] = acc.get(key, 0) + v
            for n in names[1:]:
                ratios[(n, label)].append(rate[n] / rate["base"])
                ratios[(n, label + " decode")].append(dec[n] / dec["base"])
            print(f"{r:>5} {label:8} " + " ".join(f"{rate[n]:18.1f}" for n in names) + "  "
                  + " ".join(f"{rate[n] / rate['base']:.2f}" for n in names[1:]) + "  decode tok/s "
                  + " ".join(f"{dec[n]:.1f}" for n in names) + "  "
                  + " ".join(f"{dec[n] / dec['base']:.2f}" for n in names[1:]), flush=True)
    for (n, label), xs in ratios.items():
        acc, mlen = _rates(counts[(n, label.removesuffix(" decode"))])
        print(f"{n}, {label}: median ratio {statistics.median(xs):.2f} over {len(xs)} rounds "
              f"(min {min(xs):.2f}, max {max(xs):.2f}); acceptance {acc:.3f}, mean length {mlen:.2f}")


def main() -> None:
    ns = _args()
    sweep = [int(c) for c in ns.concurrency.split(",") if c.strip()]
    seqs = ns.max_num_seqs or max([8, *sweep])
    common = dict(model=ns.model, max_model_len=ns.max_model_len, max_num_seqs=seqs)
    if ns.max_num_batched_tokens:
        common["max_num_batched_tokens"] = ns.max_num_batched_tokens
    if ns.gpu_memory_utilization:
        common["gpu_memory_utilization"] = ns.gpu_memory_utilization
    methods = ns.methods.split(",")
    ks = [int(k) for k in ns.ks.split(",")]
    sp = SamplingParams(temperature=0.0, max_tokens=ns.max_tokens, ignore_eos=True)
    n_sweep = max([ns.num_prompts, *(2 * c for c in sweep)])
    workloads = {}
    for w in ns.workloads.split(","):
        n = n_sweep if w == ns.sweep_workload and sweep else ns.num_prompts
        ps = prompts(w, n, Path(ns.stdlib), ns.context_lines)
        workloads[w] = [(p, sp) for p in ps]
    # batch 1 over num_prompts prompts; the sweep over all of the sweep workload's
    b1_loads = {w: items[:ns.num_prompts] for w, items in workloads.items()}

    threshold = None if ns.disable_by_batch_size in ("none", "default") else int(ns.disable_by_batch_size)

    drafts = ns.draft_model.split(",")

    def variants() -> list[tuple[str, str | None]]:
        """(label, draft model or None) per method: one per draft when several are given."""
        out = []
        for m in methods:
            if m != "draft_model":
                out.append((m, None))
            else:
                out += [(m if len(drafts) == 1 else f"{m}:{Path(d).name}", d) for d in drafts]
        return out

    def spec_cfg(method: str, k: int, draft: str | None) -> dict:
        d = {"method": method.split(":")[0], "num_speculative_tokens": k}
        if ns.disable_by_batch_size != "default":
            d["disable_by_batch_size"] = threshold
        if method == "ngram":
            d.update(prompt_lookup_min=ns.prompt_lookup_min, prompt_lookup_max=ns.prompt_lookup_max)
        else:
            d["model"] = draft
        return d

    def measured(args: EngineArgs) -> dict:
        engine = build_engine(args)
        if ns.staged:
            stage_inputs(engine.runner)
        trace = StepTrace.attach(engine) if ns.trace else None
        try:
            out = _measure(engine, b1_loads, sweep, ns.sweep_workload,
                           workloads.get(ns.sweep_workload, []), ns.repeat, trace)
            if ns.sync_too and args.speculative_config is not None:
                engine._overlap = False   # the async_scheduling option, toggled (benchmark only)
                out["b1_sync"] = {w: _median_run(engine, items, 1, ns.repeat)
                                  for w, items in b1_loads.items()}
            return out
        finally:
            if trace is not None:   # its class-level patch would keep the engine (and its pool) alive
                trace.detach()
            del engine, trace
            gc.collect()

    if ns.interleave:
        sweep_items = workloads.get(ns.sweep_workload, [])
        _interleaved(ns, common, b1_loads, {(m, k): spec_cfg(m, k, d) for m, d in variants() for k in ks},
                     {c: sweep_items[:max(2 * c, ns.num_prompts)] for c in sweep})
        return
    if not ns.base_last:
        base = measured(EngineArgs(**common))
    results = {(m, k): measured(EngineArgs(**common, speculative_config=spec_cfg(m, k, d)))
               for m, d in variants() for k in ks}
    if ns.base_last:
        base = measured(EngineArgs(**common))
    elif ns.base_twice:
        base = _faster(base, measured(EngineArgs(**common)))

    rows = []
    print(f"{'workload':8} {'method':11} {'k':>2} {'accept':>7} {'mean len':>8} {'b1 tok/s':>9} "
          f"{'base':>8} {'x':>5} {'decode x':>8}" + (f" {'sync tok/s':>10} {'x':>5}" if ns.sync_too else ""))
    for w in b1_loads:
        bdt, btok, _ = base["b1"][w]
        for (m, k), res in results.items():
            dt, tok, c = res["b1"][w]
            acc, mlen = _rates(c)
            row = {"table": "b1", "workload": w, "method": m, "k": k, "prompts": len(b1_loads[w]),
                   "acceptance": acc, "mean_accepted_len": mlen, "tok_s": tok / dt,
                   "base_tok_s": btok / bdt, "speedup": (tok / dt) / (btok / bdt),
                   "decode_speedup": _decode_rate(res["b1"][w]) / _decode_rate(base["b1"][w])}
            row["tokens_equal_base"] = res["tokens"][w] == base["tokens"][w]
            if not row["tokens_equal_base"]:
                print(f"  ({w}, {m}, k={k}: greedy tokens differ from the engine without speculation)")
            sync = ""
            if "b1_sync" in res:
                sdt, stok, _ = res["b1_sync"][w]
                row["sync_tok_s"] = stok / sdt
                sync = f" {row['sync_tok_s']:10.1f} {row['sync_tok_s'] / row['base_tok_s']:5.2f}"
            rows.append(row)
            print(f"{w:8} {m:11} {k:>2} {acc:7.3f} {mlen:8.2f} {row['tok_s']:9.1f} "
                  f"{row['base_tok_s']:8.1f} {row['speedup']:5.2f} {row['decode_speedup']:8.2f}" + sync)
    if sweep:
        print(f"\nconcurrency sweep ({ns.sweep_workload}: two waves of requests per concurrency, "
              f"at least {ns.num_prompts}; speculation "
              + {"none": "always on)", "default": "off above the engine's default "
                 f"disable_by_batch_size, {DISABLE_BY_BATCH_SIZE})"}.get(
                  ns.disable_by_batch_size, f"off above {ns.disable_by_batch_size} running)"))
        print(f"{'method':11} {'k':>2} {'conc':>5} {'accept':>7} {'mean len':>8} {'tok/s':>9} "
              f"{'base':>9} {'ratio':>6}")
        for (m, k), res in results.items():
            best = None
            for c in sweep:
                dt, tok, cnt = res["sweep"][c]
                bdt, btok, _ = base["sweep"][c]
                acc, mlen = _rates(cnt)
                ratio = (tok / dt) / (btok / bdt)
                if ratio >= 1.0 and (best is None or c > best):
                    best = c
                rows.append({"table": "sweep", "method": m, "k": k, "concurrency": c,
                             "acceptance": acc, "mean_accepted_len": mlen, "tok_s": tok / dt,
                             "base_tok_s": btok / bdt, "ratio": ratio})
                print(f"{m:11} {k:>2} {c:>5} {acc:7.3f} {mlen:8.2f} {tok / dt:9.1f} "
                      f"{btok / bdt:9.1f} {ratio:6.2f}")
            hint = (f"disable_by_batch_size = {best}" if best is not None and best != sweep[-1]
                    else "no threshold needed up to the largest concurrency measured"
                    if best is not None else "speculation never paid: leave it off")
            print(f"{m:11} {k:>2} -> {hint}")
        for name, res in [("no speculation", base),
                          *((f"{m}, k = {k}", r) for (m, k), r in results.items())]:
            for table in res["traces"].values():
                print(table.replace("### step trace:", f"### step trace, {name}:"))
    if ns.json:
        Path(ns.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
