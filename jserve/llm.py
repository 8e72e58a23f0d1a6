"""LLM: the offline Python API (vLLM's names), for scripts and notebooks.

Where it sits: the top of the data path for offline use: ``LLM.generate`` queues prompts on
an ``LLMEngine`` and steps it until every request finishes. No asyncio, so it runs inside
Jupyter/Colab's event loop untouched.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from jserve.builder import build_engine
from jserve.engine import LLMEngine, Prompt
from jserve.options import EngineArgs, check_keywords
from jserve.outputs import RequestOutput
from jserve.request import RequestStatus
from jserve.sampling_params import SamplingParams


class LLM:
    """``LLM(model=path_or_named_shape, dtype=..., max_model_len=..., max_num_seqs=...,
    kv_cache_memory_fraction=... or num_pages=..., tensor_parallel_size=...)``.

    The keywords are the engine options declared in jserve/options.py (``EngineArgs`` fields),
    with their declared defaults: an unknown keyword is a ``TypeError`` naming it, a bad value
    a ``ValueError`` naming the field, both before anything is loaded.
    """

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        check_keywords("LLM", kwargs)
        self.engine_args = EngineArgs(model=model, **kwargs)
        self.engine: LLMEngine = build_engine(self.engine_args, progress=_progress_line)

    def get_tokenizer(self):  # noqa: ANN201 - returns jserve.tokenizer.Tokenizer
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | dict | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Generate for one prompt or a list (text or token-id lists); outputs keep input order.

        Any invalid prompt or parameter raises ``ValueError`` before generation starts and
        leaves the engine serving whatever it was serving.
        """
        prompt_list = _as_prompt_list(prompts)
        params_list = _as_params_list(sampling_params, len(prompt_list))
        return self._run([(p, sp, True) for p, sp in zip(prompt_list, params_list, strict=True)],
                         use_tqdm)

    def chat(self, messages: list[dict[str, str]] | list[list[dict[str, str]]],
             sampling_params: SamplingParams | dict | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = False, add_generation_prompt: bool = True) -> list[RequestOutput]:
        """Render each conversation with the model's chat template, then generate."""
        tok = self.engine.tokenizer
        if tok is None:
            raise ValueError("chat: this model has no tokenizer")
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        ids = [tok.encode(tok.apply_chat_template(c, add_generation_prompt=add_generation_prompt),
                          add_special_tokens=False) for c in convs]
        params_list = _as_params_list(sampling_params, len(ids))
        return self._run(list(zip(ids, params_list, [True] * len(ids), strict=True)), use_tqdm)

    def _run(self, items: list[tuple[Prompt, SamplingParams, bool]], use_tqdm: bool
             ) -> list[RequestOutput]:
        engine = self.engine
        order: list[str] = []
        try:
            for prompt, sp, _ in items:
                order.append(engine.add_request(None, prompt, sp))
        except Exception:
            for rid in order:
                engine.abort_request(rid)
            _drain(engine, set(order))
            raise
        pending, final = set(order), {}
        done = 0
        while pending:
            for out in engine.step():
                if out.finished and out.request_id in pending:
                    final[out.request_id] = out
                    pending.discard(out.request_id)
                    done += 1
                    if use_tqdm:
                        print(f"\rgenerate: {done}/{len(order)} requests", end="", file=sys.stderr)
        if use_tqdm:
            print(file=sys.stderr)
        return [final[rid] for rid in order]


def _progress_line(line: str) -> None:
    """Start-up progress for notebooks and scripts (logging is often unconfigured there)."""
    print(f"[jserve] {line}", file=sys.stderr, flush=True)


def _drain(engine: LLMEngine, ids: set[str]) -> None:
    """Step until the aborted ``ids`` have reported finished (frees their pages)."""
    while ids and engine.has_unfinished_requests():
        for out in engine.step():
            ids.discard(out.request_id)


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, (list, tuple)) and prompts and all(isinstance(t, int) for t in prompts):
        return [list(prompts)]
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts: expected a string, a token-id list, or a non-empty list of them")
    return list(prompts)


def _as_params_list(sp: Any, n: int) -> list[SamplingParams]:
    if sp is None:
        return [SamplingParams()] * n
    if isinstance(sp, dict):
        return [SamplingParams.from_dict(sp)] * n
    if isinstance(sp, SamplingParams):
        return [sp] * n
    sps = [SamplingParams.from_dict(x) if isinstance(x, dict) else x for x in sp]
    if len(sps) != n:
        raise ValueError(f"sampling_params: got {len(sps)} for {n} prompts")
    for x in sps:
        if not isinstance(x, SamplingParams):
            raise ValueError(f"sampling_params: expected SamplingParams, got {type(x).__name__}")
    return sps


__all__ = ["LLM", "RequestStatus"]
