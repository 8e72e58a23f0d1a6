"""Runner: packs a SchedulerOutput into bucketed device input, runs the jitted step + sampler.

Where it sits: between ``Scheduler.schedule()`` and ``Scheduler.update()``::

    SchedulerOutput --prepare (host numpy)--> StepInput + SamplingBatch --device_put-->
    step_fn(params, kv [donated], batch) -> (kv, logits[R, V]) --> sampler -> tokens[R]
    --> RunnerOutput (host numpy)

Shapes are bucketed (DESIGN invariant 4): the token count pads to a power-of-two bucket and
the request rows to that bucket's row count; ``warmup()`` compiles every bucket at start-up,
so serving never compiles. Buckets of at least ``flash_prefill_min_tokens`` also compile a
``fresh_prefill`` variant (flash attention over the chunk's own K/V), which ``execute`` picks on
the host for steps whose chunks all start at token 0 (no cached context): no device-side branch.
Page moves the scheduler asked for (copy-on-write, swap, host KV tier:
``SchedulerOutput.transfers``) run just before the step (``KVPageMover``).
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jserve.config import EngineConfig
from jserve.kv_cache import KVCache
from jserve.kv_transfer import KVPageMover
from jserve.model.decoder import forward
from jserve.request import Request
from jserve.sampler import make_sampler
from jserve.sampling_batch import SamplingRow, pack_sampling, required_flags, serving_flag_sets, serving_flags
from jserve.scheduler_output import RunnerOutput, SchedulerOutput
from jserve.step_input import StepInput

log = logging.getLogger(__name__)


class Runner:
    """Owns the params, the KV pool and the compiled step/sampler functions."""

    def __init__(self, config: EngineConfig, params: Any, kv: KVCache, mesh: Mesh) -> None:
        self.config = config
        self.params = params
        self.kv = kv
        self.mesh = mesh
        self._replicated = NamedSharding(mesh, PartitionSpec())
        self._step = jax.jit(functools.partial(forward, config.model, mesh=mesh), donate_argnums=(1,))
        self._step_fresh = jax.jit(functools.partial(forward, config.model, fresh_prefill=True, mesh=mesh),
                                   donate_argnums=(1,))
        self._sample = make_sampler()
        self._buckets = config.scheduler.token_buckets
        self._pages_per_seq = config.pages_per_seq
        self._page_size = config.cache.page_size
        cache = config.cache
        host_moves = ((cache.preemption_mode == "swap" and cache.swap_space_gb > 0)
                      or cache.host_kv_cache_gb > 0)
        self.mover = KVPageMover(kv, max(self._pages_per_seq, config.scheduler.max_num_seqs),
                                 host_moves)

    # ---------------------------------------------------------------- shapes
    def bucket_for(self, num_tokens: int) -> tuple[int, int]:
        """-> (token bucket T, row bucket R) for a step of ``num_tokens`` tokens."""
        for t in self._buckets:
            if num_tokens <= t:
                return t, self.config.scheduler.seq_bucket(t)
        raise ValueError(f"step of {num_tokens} tokens exceeds max_num_batched_tokens "
                         f"({self._buckets[-1]})")

    # ---------------------------------------------------------------- host packing
    def prepare(self, out: SchedulerOutput) -> tuple[StepInput, list[SamplingRow | None]]:
        """Host-side packing into numpy arrays of the bucket shape (no device work)."""
        t_bucket, r_bucket = self.bucket_for(out.num_tokens)
        if out.num_seqs > r_bucket:
            raise ValueError(f"{out.num_seqs} rows exceed the row bucket {r_bucket}")
        b = StepInput.empty(t_bucket, r_bucket, self._pages_per_seq)
        ps = self._page_size
        rows: list[SamplingRow | None] = []
        pos0 = 0
        for r, chunk in enumerate(out.chunks):
            req, n, start = chunk.request, chunk.num_tokens, chunk.start
            end = start + n
            b.token_ids[pos0:pos0 + n] = _token_slice(req, start, end)
            positions = np.arange(start, end, dtype=np.int32)
            b.positions[pos0:pos0 + n] = positions
            pages = np.asarray(req.page_ids, np.int32)
            b.slot_mapping[pos0:pos0 + n] = pages[positions // ps] * ps + positions % ps
            b.page_table[r, :len(pages)] = pages
            b.seq_lens[r] = end
            b.query_start_loc[r + 1] = pos0 + n
            b.logits_indices[r] = pos0 + n - 1
            rows.append(_sampling_row(req) if chunk.samples else None)
            pos0 += n
        b.query_start_loc[out.num_seqs + 1:] = pos0
        b.num_seqs[0] = out.num_seqs
        return b, rows

    # ---------------------------------------------------------------- device
    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        if out.transfers:
            self.kv = self.mover.move(self.kv, out.transfers)
        if not out.chunks:
            return RunnerOutput(np.zeros(0, np.int32))
        batch_np, rows = self.prepare(out)
        r_bucket = batch_np.num_rows
        vocab, max_len = self.config.model.vocab_size, self.config.scheduler.max_model_len
        flags = serving_flags(required_flags(rows, vocab), max_len)
        sbatch, flags = pack_sampling(rows, r_bucket, vocab, flags=flags)
        batch, sbatch = jax.device_put((batch_np, sbatch), self._replicated)
        self.kv, logits = self.step_fn(out, batch_np.num_tokens)(self.params, self.kv, batch)
        res = self._sample(logits, sbatch, flags)
        n = out.num_seqs
        tokens = np.asarray(res.token_ids)[:n]
        if any(row is not None and row.params.logprobs is not None for row in rows):
            return RunnerOutput(tokens, np.asarray(res.logprobs)[:n], np.asarray(res.top_ids)[:n],
                                np.asarray(res.top_logprobs)[:n])
        return RunnerOutput(tokens)

    def step_fn(self, out: SchedulerOutput, token_bucket: int) -> Any:
        """The compiled step for ``out``: the flash variant when every chunk is a fresh prompt and
        the bucket has one, else the paged one."""
        if (self.config.scheduler.flash_prefill(token_bucket)
                and all(c.start == 0 for c in out.chunks)):
            return self._step_fresh
        return self._step

    def warmup(self) -> float:
        """Compile (and run once) every bucket of the step and every sampler variant."""
        t0 = time.perf_counter()
        vocab = self.config.model.vocab_size
        for t_bucket in self._buckets:
            r_bucket = self.config.scheduler.seq_bucket(t_bucket)
            batch = jax.device_put(StepInput.empty(t_bucket, r_bucket, self._pages_per_seq),
                                   self._replicated)
            self.kv, logits = self._step(self.params, self.kv, batch)
            if self.config.scheduler.flash_prefill(t_bucket):
                self.kv, logits = self._step_fresh(self.params, self.kv, batch)
            for flags in serving_flag_sets(self.config.scheduler.max_model_len):
                sbatch = jax.device_put(pack_sampling([], r_bucket, vocab, flags=flags)[0],
                                        self._replicated)
                jax.block_until_ready(self._sample(logits, sbatch, flags))
        self.kv = self.mover.warmup(self.kv)
        jax.block_until_ready(self.kv)
        elapsed = time.perf_counter() - t0
        log.info("compiled %d step buckets %s in %.1f s", len(self._buckets), self._buckets, elapsed)
        return elapsed


def _token_slice(req: Request, start: int, end: int) -> list[int]:
    p = req.num_prompt_tokens
    if end <= p:
        return req.prompt_token_ids[start:end]
    if start >= p:
        return req.output_token_ids[start - p:end - p]
    return req.prompt_token_ids[start:] + req.output_token_ids[:end - p]


def _sampling_row(req: Request) -> SamplingRow:
    sp = req.sampling_params
    banned: tuple[int, ...] = ()
    if req.num_output_tokens < sp.min_tokens:
        banned = tuple(sp.stop_token_ids) + (() if sp.ignore_eos else tuple(req.eos_token_ids))
    return SamplingRow(params=sp, seed=req.seed, output_index=req.num_output_tokens,
                       prompt_token_ids=req.prompt_token_ids,
                       output_token_ids=req.output_token_ids, banned_ids=banned)
