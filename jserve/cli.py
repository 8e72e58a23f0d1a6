"""The ``jserve`` command line: ``generate`` now; ``serve``, ``bench``, ``plan`` register here.

Where it sits: a thin shell over ``LLM`` / the engine API; flags map 1:1 onto ``EngineArgs``
and ``SamplingParams`` fields.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence

from jserve.builder import EngineArgs


def add_engine_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF model directory (default: the bundled "
                   "code-small model), or a named shape with --random-weights")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"])
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--num-pages", type=int, default=None)
    p.add_argument("--kv-cache-memory-fraction", type=float, default=0.85)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--tensor-parallel-size", "--tp", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--random-weights", action="store_true",
                   help="random weights of a named shape (llama3.1-8b, qwen2.5-0.5b, ...)")
    p.add_argument("--compilation-cache-dir", default=None)
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the KV of shared prompt prefixes (default: on)")
    p.add_argument("--swap-space-gb", "--swap-space", type=float, default=4.0,
                   help="host memory (GiB) for the KV pages of preempted requests")
    p.add_argument("--host-kv-cache-gb", type=float, default=0.0,
                   help="host memory (GiB) that keeps KV pages evicted from the device prefix "
                   "cache, for later hits (0 = off)")
    p.add_argument("--preemption-mode", choices=["swap", "recompute"], default="swap")
    p.add_argument("--flash-prefill-min-tokens", type=int, default=1024,
                   help="steps of at least this many tokens made only of fresh prompts attend with "
                   "the flash kernel instead of the paged one (0 = never)")


def engine_args_from(ns: argparse.Namespace) -> EngineArgs:
    return EngineArgs(
        model=ns.model, dtype=ns.dtype, max_model_len=ns.max_model_len,
        max_num_seqs=ns.max_num_seqs, max_num_batched_tokens=ns.max_num_batched_tokens,
        num_pages=ns.num_pages, kv_cache_memory_fraction=ns.kv_cache_memory_fraction,
        page_size=ns.page_size, tensor_parallel_size=ns.tensor_parallel_size, seed=ns.seed,
        random_weights=ns.random_weights, compilation_cache_dir=ns.compilation_cache_dir,
        enable_prefix_caching=ns.enable_prefix_caching, swap_space_gb=ns.swap_space_gb,
        host_kv_cache_gb=ns.host_kv_cache_gb, preemption_mode=ns.preemption_mode,
        flash_prefill_min_tokens=ns.flash_prefill_min_tokens)


def _cmd_generate(ns: argparse.Namespace) -> int:
    from jserve.llm import LLM
    from jserve.sampling_params import SamplingParams

    t0 = time.perf_counter()
    args = engine_args_from(ns)
    llm = LLM(**{k: v for k, v in vars(args).items()})
    print(f"[jserve] engine ready in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    sp = SamplingParams(temperature=ns.temperature, top_p=ns.top_p, top_k=ns.top_k,
                        max_tokens=ns.max_tokens, seed=ns.sampling_seed)
    prompts = ns.prompt or ["def fibonacci(n):"]
    t1 = time.perf_counter()
    outs = llm.generate(prompts, sp)
    dt = time.perf_counter() - t1
    ntok = 0
    for out in outs:
        comp = out.outputs[0]
        ntok += len(comp.token_ids)
        print(out.prompt + comp.text if out.prompt else comp.text)
        print(f"--- finish_reason={comp.finish_reason} tokens={len(comp.token_ids)}",
              file=sys.stderr)
    print(f"[jserve] {ntok} tokens in {dt:.2f} s ({ntok / max(dt, 1e-9):.1f} tok/s)", file=sys.stderr)
    return 0


def _cmd_plan(ns: argparse.Namespace) -> int:
    from jserve.plan import plan_capacity

    plan = plan_capacity(model=ns.model, gpu=ns.gpu, max_model_len=ns.max_model_len, dtype=ns.dtype,
                         kv_cache_dtype=ns.kv_cache_dtype, tensor_parallel_size=ns.tensor_parallel_size,
                         kv_cache_memory_fraction=ns.kv_cache_memory_fraction, page_size=ns.page_size,
                         max_num_seqs=ns.max_num_seqs)
    print(plan.render())
    return 0


def add_plan_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="capacity planner: weights, KV bytes, pages and sequences that fit",
                       description="Print the KV pool the engine would allocate at start-up, with the "
                       "arithmetic, for a model on an accelerator (no device needed).")
    p.add_argument("--model", default=None, help="HF model directory, a named shape (llama3.1-8b, "
                   "qwen2.5-0.5b, llama3.1-70b), or nothing for the bundled model")
    p.add_argument("--gpu", default="H100-80GB", help="H100-80GB, H200, A100-40GB, A100-80GB, L4, "
                   "RTX-4090, TPU-v5e, TPU-v6e, or a byte count (the allocator's bytes_limit)")
    p.add_argument("--max-model-len", "--context", type=int, default=None,
                   help="context length per sequence (default: min(model max positions, 4096))")
    p.add_argument("--dtype", default=None, help="weight dtype (default: the checkpoint's)")
    p.add_argument("--kv-cache-dtype", default="auto", help="KV dtype (auto = the weight dtype)")
    p.add_argument("--tensor-parallel-size", "--tp", type=int, default=1)
    p.add_argument("--kv-cache-memory-fraction", type=float, default=0.85)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.set_defaults(func=_cmd_plan)


def build_parser() -> argparse.ArgumentParser:
    return build_parser_and_subcommands()[0]


def build_parser_and_subcommands() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    """The ``jserve`` parser and its subcommand table (front-ends add ``serve``/``bench``)."""
    parser = argparse.ArgumentParser(prog="jserve", description="LLM serving in JAX/XLA")
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text offline")
    add_engine_flags(g)
    g.add_argument("--prompt", action="append", help="prompt text (repeatable)")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--sampling-seed", type=int, default=None)
    # A few prompts from a shell: a small batch compiles 4 step buckets instead of 6, so the first
    # run on a CPU is ready in seconds (later runs hit the persistent compilation cache).
    g.set_defaults(func=_cmd_generate, max_num_seqs=8, max_num_batched_tokens=128)
    add_plan_parser(sub)
    return parser, sub


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    logging.basicConfig(level=ns.log_level.upper(), format="%(asctime)s %(name)s: %(message)s")
    try:
        return ns.func(ns)
    except ValueError as e:
        print(f"jserve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
