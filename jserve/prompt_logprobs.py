"""PromptScorer: the logprob of every prompt token under the model (vLLM's ``prompt_logprobs``).

Where it sits: beside the step loop, not in it. ``LLMEngine.add_request`` scores a prompt whose
``SamplingParams.prompt_logprobs`` is set, before queueing it, and every ``RequestOutput`` of
the request carries the result::

    prompt ids [P] --pad to a power-of-two bucket T--> hidden_states(fresh_prefill=True)
        (flash attention over the prompt's own K/V; the K/V land in a one-page scratch pool,
         never in the engine's pool, so the scheduler, the runner and the prefix cache are
         untouched)
      --per chunk of C rows: logits -> log_softmax--> logprob of token i+1 at row i [T],
                                                      its rank [T], top-N ids / logprobs [T, N]

The logits are made C rows at a time (``lax.map``), so a long prompt never holds a [P, V]
float32 array. Logprobs are the model's raw distribution (log_softmax of the unprocessed
logits), as the sampler's ``logprobs`` and vLLM's default.

Cost: one extra prefill of the prompt, run on the engine thread when the request is added;
each token bucket compiles once, on its first use (through the persistent compilation cache):
``prompt_logprobs`` is a rare, analysis-time feature, and compiling its programs at start-up
would slow every start. Scoring takes the weights as they are (no donation), so it may run
while a step is in flight.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jserve.config import ModelConfig
from jserve.kv_cache import allocate_kv_cache
from jserve.model.decoder import hidden_states, logits_from_hidden
from jserve.outputs import Logprob
from jserve.sampling_params import MAX_LOGPROBS
from jserve.step_input import StepInput

PromptLogprobs = list[dict[int, Logprob] | None]
MIN_BUCKET = 16
LOGIT_CHUNK = 256          # rows of logits made at once


def _bucket(n: int) -> int:
    return max(MIN_BUCKET, 1 << (n - 1).bit_length())


def _score(cfg: ModelConfig, mesh: Mesh | None, params: Any, kv: Any, batch: StepInput,
           targets: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """targets: int32[T] (the token after each row) -> (logprob f32[T], rank int32[T],
    top ids int32[T, N], top logprobs f32[T, N]), N = MAX_LOGPROBS."""
    h, _ = hidden_states(cfg, params, kv, batch, fresh_prefill=True, mesh=mesh)
    t = h.shape[0]
    c = min(LOGIT_CHUNK, t)
    n = min(MAX_LOGPROBS, cfg.vocab_size)

    def chunk(args: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, ...]:
        hc, tc = args
        lp = jax.nn.log_softmax(logits_from_hidden(cfg, params, hc, mesh), axis=-1)   # [C, V]
        chosen = jnp.take_along_axis(lp, tc[:, None], axis=1)[:, 0]
        rank = 1 + jnp.sum(lp > chosen[:, None], axis=1, dtype=jnp.int32)
        top_lp, top_ids = jax.lax.top_k(lp, n)
        return chosen, rank, top_ids.astype(jnp.int32), top_lp

    out = jax.lax.map(chunk, (h.reshape(t // c, c, -1), targets.reshape(t // c, c)))
    return tuple(a.reshape(t, *a.shape[2:]) for a in out)


class PromptScorer:
    """Scores prompts with the engine's weights (read only) and a one-page scratch KV pool."""

    def __init__(self, cfg: ModelConfig, params: Any, mesh: Mesh, kv_dtype: str, page_size: int,
                 decode: Any = None) -> None:
        self.cfg = cfg
        self.params = params
        self.mesh = mesh
        self._decode = decode            # token id -> text (None without a tokenizer)
        self._kv = allocate_kv_cache(cfg, 1, page_size, kv_dtype, mesh)
        self._fn = jax.jit(functools.partial(_score, cfg, mesh))

    def score(self, ids: list[int], top_n: int) -> PromptLogprobs:
        """-> one entry per prompt token: None for the first, then {token: Logprob} with the
        prompt token first (its rank among all tokens) and the ``top_n`` most likely tokens."""
        p = len(ids)
        if p < 2:
            return [None] * p
        t = _bucket(p)
        tokens = np.zeros(t, np.int32)
        tokens[:p] = ids
        targets = np.zeros(t, np.int32)
        targets[:p - 1] = ids[1:]
        z = lambda *s: np.zeros(s, np.int32)
        positions = np.zeros(t, np.int32)
        positions[:p] = np.arange(p)
        batch = StepInput(token_ids=tokens, positions=positions, slot_mapping=z(t),
                          page_table=z(1, 1), seq_lens=np.array([p], np.int32),
                          query_start_loc=np.array([0, p], np.int32), num_seqs=np.array([1], np.int32),
                          logits_indices=np.array([p - 1], np.int32))
        chosen, rank, top_ids, top_lp = (np.asarray(a) for a in self._fn(self.params, self._kv, batch,
                                                                          targets))
        out: PromptLogprobs = [None]
        for i in range(p - 1):
            tid = int(ids[i + 1])
            entry = {tid: Logprob(float(chosen[i]), int(rank[i]), self._text(tid))}
            for r in range(top_n):
                t_id = int(top_ids[i, r])
                if t_id not in entry:
                    entry[t_id] = Logprob(float(top_lp[i, r]), r + 1, self._text(t_id))
            out.append(entry)
        return out

    def _text(self, tid: int) -> str | None:
        return self._decode(tid) if self._decode is not None else None
