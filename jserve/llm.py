"""LLM: the offline Python API (vLLM's names), for scripts and notebooks.

Where it sits: the top of the data path for offline use: ``LLM.generate`` queues prompts on
an ``LLMEngine`` and steps it until every request finishes. No asyncio, so it runs inside
Jupyter/Colab's event loop untouched.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from tqdm import tqdm

from jserve.builder import build_engine
from jserve.engine import LLMEngine, Prompt
from jserve.options import EngineArgs, check_keywords
from jserve.outputs import RequestOutput
from jserve.request import RequestStatus
from jserve.sampling_params import RequestOutputKind, SamplingParams

# What ``LLM.generate`` takes per prompt: text, token ids, or vLLM's prompt dict.
PromptInput = Prompt | dict[str, Any]


class LLM:
    """``LLM(model=path_or_named_shape, dtype=..., max_model_len=..., max_num_seqs=...,
    gpu_memory_utilization=... or num_pages=..., tensor_parallel_size=...)``.

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

    def generate(self, prompts: PromptInput | Sequence[PromptInput],
                 sampling_params: SamplingParams | dict | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool | Callable[..., Any] = False) -> list[RequestOutput]:
        """Generate for one prompt or a list; outputs keep input order. A prompt is text, a
        token-id list, or vLLM's prompt dict ``{"prompt": text}`` / ``{"prompt_token_ids": ids}``.
        ``use_tqdm``: a tqdm progress bar on stderr (or a tqdm-like class to make it with).

        Any invalid prompt or parameter raises ``ValueError`` before generation starts and
        leaves the engine serving whatever it was serving.
        """
        prompt_list = _as_prompt_list(prompts)
        params_list = _as_params_list(sampling_params, len(prompt_list))
        return self._run(list(zip(prompt_list, params_list, strict=True)), use_tqdm)

    def chat(self, messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
             sampling_params: SamplingParams | dict | Sequence[SamplingParams] | None = None,
             use_tqdm: bool | Callable[..., Any] = False, add_generation_prompt: bool = True,
             continue_final_message: bool = False, chat_template: str | None = None,
             chat_template_kwargs: dict[str, Any] | None = None,
             tools: list[dict[str, Any]] | None = None) -> list[RequestOutput]:
        """Render each conversation with the model's chat template (or ``chat_template``), then
        generate. ``chat_template_kwargs`` are extra template variables (``enable_thinking``);
        ``continue_final_message`` continues the last assistant message instead of starting a
        new turn (set ``add_generation_prompt=False`` with it, as in vLLM)."""
        tok = self.engine.tokenizer
        if tok is None:
            raise ValueError("chat: this model has no tokenizer")
        if chat_template_kwargs is not None and not isinstance(chat_template_kwargs, dict):
            raise ValueError("chat_template_kwargs must be a dict")
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        ids = [tok.encode(tok.apply_chat_template(
            c, add_generation_prompt=add_generation_prompt, tools=tools, chat_template=chat_template,
            template_kwargs=chat_template_kwargs, continue_final_message=continue_final_message),
            add_special_tokens=False) for c in convs]
        params_list = _as_params_list(sampling_params, len(ids))
        return self._run(list(zip(ids, params_list, strict=True)), use_tqdm)

    def _run(self, items: list[tuple[Prompt, SamplingParams]], use_tqdm: bool | Callable[..., Any]
             ) -> list[RequestOutput]:
        engine = self.engine
        order: list[str] = []
        final_only: dict[int, SamplingParams] = {}   # only finished outputs are read here
        try:
            for prompt, sp in items:
                if isinstance(sp, SamplingParams) and sp.structured_outputs is not None:
                    engine.compile_grammar(sp)   # (once per spec: cached; the device automaton too)
                if isinstance(sp, SamplingParams) and sp.output_kind is not RequestOutputKind.FINAL_ONLY:
                    if id(sp) not in final_only:
                        final_only[id(sp)] = sp.replace(output_kind=RequestOutputKind.FINAL_ONLY)
                    sp = final_only[id(sp)]
                order.append(engine.add_request(None, prompt, sp))
        except Exception:
            for rid in order:
                engine.abort_request(rid)
            _drain(engine, set(order))
            raise
        pending, final = set(order), {}
        bar = _progress_bar(use_tqdm, len(order))
        t0, prompt_toks, out_toks = time.perf_counter(), 0, 0
        try:
            while pending:
                for out in engine.step():
                    if out.finished and out.request_id in pending:
                        final[out.request_id] = out
                        pending.discard(out.request_id)
                        if bar is not None:
                            prompt_toks += len(out.prompt_token_ids)
                            out_toks += sum(len(c.token_ids) for c in out.outputs)
                            dt = max(time.perf_counter() - t0, 1e-9)
                            bar.set_postfix_str(f"est. speed input: {prompt_toks / dt:.1f} toks/s, "
                                                f"output: {out_toks / dt:.1f} toks/s", refresh=False)
                            bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        return [final[rid] for rid in order]


def _progress_bar(use_tqdm: bool | Callable[..., Any], total: int) -> Any:
    """vLLM's bar: one tick per finished prompt, input / output tok/s as the postfix."""
    if not use_tqdm:
        return None
    make = use_tqdm if callable(use_tqdm) else tqdm
    return make(total=total, desc="Processed prompts", dynamic_ncols=True, file=sys.stderr)


def _progress_line(line: str) -> None:
    """Start-up progress for notebooks and scripts (logging is often unconfigured there)."""
    print(f"[jserve] {line}", file=sys.stderr, flush=True)


def _drain(engine: LLMEngine, ids: set[str]) -> None:
    """Step until the aborted ``ids`` have reported finished (frees their pages)."""
    while ids and engine.has_unfinished_requests():
        for out in engine.step():
            ids.discard(out.request_id)


def _one_prompt(p: Any, where: str) -> Prompt:
    """Text, token ids, or a prompt dict -> text or token ids."""
    if not isinstance(p, dict):
        return p
    keys = set(p)
    unknown = keys - {"prompt", "prompt_token_ids"}
    if unknown:
        raise ValueError(f"{where}: unsupported prompt dict key(s) {sorted(unknown)}; "
                         "expected 'prompt' or 'prompt_token_ids'")
    if len(keys) != 1:
        raise ValueError(f"{where}: a prompt dict needs exactly one of 'prompt' or 'prompt_token_ids'")
    if "prompt" in p:
        if not isinstance(p["prompt"], str):
            raise ValueError(f"{where}['prompt'] must be a string")
        return p["prompt"]
    ids = p["prompt_token_ids"]
    if not isinstance(ids, (list, tuple)):
        raise ValueError(f"{where}['prompt_token_ids'] must be a list of token ids")
    return list(ids)


def _as_prompt_list(prompts: Any) -> list[Prompt]:
    if isinstance(prompts, (str, dict)):
        return [_one_prompt(prompts, "prompts")]
    if isinstance(prompts, (list, tuple)) and prompts and all(isinstance(t, int) for t in prompts):
        return [list(prompts)]
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts: expected a string, a token-id list, a prompt dict, or a non-empty "
                         "list of them")
    return [_one_prompt(p, f"prompts[{i}]") for i, p in enumerate(prompts)]


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
