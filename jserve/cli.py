"""The ``jserve`` command line: ``generate`` now; ``serve``, ``bench``, ``plan`` register here.

Where it sits: a thin shell over ``LLM`` / the engine API. Engine flags are generated from the
option declaration (jserve/options.py) and map 1:1 onto ``EngineArgs`` fields; sampling flags
map onto ``SamplingParams``.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Sequence

from jserve import __version__
from jserve.convert import add_convert_parser
from jserve.options import OPTIONS, EngineArgs, Option, options_for

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# Python spellings of options in messages raised by the engine -> the flag a CLI user types.
_KEYWORD = re.compile(r"\b(" + "|".join(sorted(OPTIONS, key=len, reverse=True)) + r")=(\w+)")


def add_engine_flags(p: argparse.ArgumentParser, command: str) -> None:
    """One flag per option ``command`` exposes (jserve/options.py), its default in the help."""
    for opt in options_for(command):
        default = opt.default_for(command)
        if command in opt.command_defaults or opt.default_text is None:
            shown = "%(default)s"
        else:
            shown = opt.default_text.replace("%", "%%")
        help_text = f"{opt.help.replace('%', '%%')} (default: {shown})"
        if opt.type is bool:
            p.add_argument(*opt.flags(command), dest=opt.name, action=argparse.BooleanOptionalAction,
                           default=default, help=help_text)
        else:
            p.add_argument(*opt.flags(command), dest=opt.name, type=_flag_type(opt), default=default,
                           choices=opt.choices, help=help_text)


def _flag_type(opt: Option) -> Callable[[str], object]:
    """argparse's ``type=`` for ``opt``: a bad value is a usage error that names the option."""

    def parse(text: str) -> object:
        try:
            return opt.parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = opt.name   # argparse names the type in some messages
    return parse


def option_values(ns: argparse.Namespace) -> dict[str, object]:
    """The declared options a parsed command line holds, by name (flags it lacks are left out)."""
    given = vars(ns)
    return {name: given[name] for name in OPTIONS if name in given}


def engine_args_from(ns: argparse.Namespace) -> EngineArgs:
    return EngineArgs(**option_values(ns))


def _cmd_generate(ns: argparse.Namespace) -> int:
    from jserve.llm import LLM
    from jserve.sampling_params import SamplingParams, rename_fields

    flags = {"temperature": "--temperature", "top_p": "--top-p", "top_k": "--top-k",
             "max_tokens": "--max-tokens", "seed": "--sampling-seed"}
    try:   # checked before the engine builds, and named as the flags that set them
        sp = SamplingParams(temperature=ns.temperature, top_p=ns.top_p, top_k=ns.top_k,
                            max_tokens=ns.max_tokens, seed=ns.sampling_seed)
    except ValueError as e:
        raise ValueError(rename_fields(str(e), flags)[1]) from None
    t0 = time.perf_counter()
    llm = LLM(**option_values(ns))
    print(f"[jserve] engine ready in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
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

    print(plan_capacity(gpu=ns.gpu, **option_values(ns)).render())
    return 0


def add_plan_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="capacity planner: weights, KV bytes, pages and sequences that fit",
                       description="Print the KV pool the engine would allocate at start-up, with the "
                       "arithmetic, for a model on an accelerator (no device needed).")
    p.add_argument("--gpu", default="H100-80GB", help="H100-80GB, H200, A100-40GB, A100-80GB, L4, "
                   "RTX-4090, TPU-v5e, TPU-v6e, or a byte count (the allocator's bytes_limit) "
                   "(default: %(default)s)")
    add_engine_flags(p, "plan")
    p.set_defaults(func=_cmd_plan)


def build_parser() -> argparse.ArgumentParser:
    return build_parser_and_subcommands()[0]


def build_parser_and_subcommands() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    """The ``jserve`` parser and its subcommand table (front-ends add ``serve``/``bench``)."""
    parser = argparse.ArgumentParser(prog="jserve", description="LLM serving in JAX/XLA")
    parser.add_argument("--version", action="version", version=f"jserve {__version__}")
    parser.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS,
                        help="log verbosity (default: %(default)s)")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text offline")
    add_engine_flags(g, "generate")
    g.add_argument("--prompt", action="append",
                   help="prompt text (repeatable) (default: one 'def fibonacci(n):' prompt)")
    g.add_argument("--max-tokens", type=int, default=64,
                   help="tokens to generate per prompt (default: %(default)s)")
    g.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature, 0 = greedy (default: %(default)s)")
    g.add_argument("--top-p", type=float, default=1.0,
                   help="nucleus sampling mass, 1 = off (default: %(default)s)")
    g.add_argument("--top-k", type=int, default=0,
                   help="sample from the k most likely tokens, 0 = off (default: %(default)s)")
    g.add_argument("--sampling-seed", type=int, default=None,
                   help="seed of the sampler, for reproducible sampling (default: the engine's --seed)")
    # generate's smaller max_num_seqs / max_num_batched_tokens defaults are declared with the
    # options (command_defaults): a small batch compiles 4 step buckets instead of 6, so the first
    # run on a CPU is ready in seconds (later runs hit the persistent compilation cache).
    g.set_defaults(func=_cmd_generate)
    add_plan_parser(sub)
    add_convert_parser(sub)
    return parser, sub


class _NoTPUProbeLine(logging.Filter):
    """Drops JAX's "Unable to initialize backend 'tpu'" record: every machine without a TPU
    logs it at start-up, and it reads like an error."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Unable to initialize backend 'tpu'")


def configure_logging(level: str) -> None:
    """The CLI's logging: ``level`` for everything, JAX's TPU probe line hidden."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("jax._src.xla_bridge").addFilter(_NoTPUProbeLine())
    logging.getLogger("absl").setLevel(max(logging.WARNING, logging.getLogger().level))  # orbax


def cli_message(error: BaseException) -> str:
    """An engine error as the CLI user should read it: Python keywords (``random_weights=True``)
    become the flags they type (``--random-weights``)."""

    def flag(m: re.Match) -> str:
        name, value = m.group(1), m.group(2)
        opt = OPTIONS[name]
        if opt.type is bool:
            return opt.flag if value == "True" else "--no-" + opt.flag[2:]
        return f"{opt.flag} {value}"

    return _KEYWORD.sub(flag, str(error))


def run_command(ns: argparse.Namespace) -> int:
    """Run the parsed command; a user error (bad value, missing or unusable file) is one
    ``jserve: error:`` line on stderr and exit status 2, never a traceback."""
    try:
        return ns.func(ns)
    except (ValueError, OSError) as e:
        print(f"jserve: error: {cli_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except RuntimeError as e:
        from jserve.multiprocess import PeerError

        if not isinstance(e, PeerError):
            raise
        print(f"jserve: error: {e}", file=sys.stderr, flush=True)
        os._exit(3)   # not sys.exit: JAX's shutdown barrier would wait for the dead peer


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    configure_logging(ns.log_level)
    return run_command(ns)


if __name__ == "__main__":
    sys.exit(main())
