"""Penalties served from the device state give the host reference's tokens (tiny golden llama).

The reference is the pure sampler (``sampler.sample``) with the whole history packed on the
host (``pack_sampling``), over the model's logits of the same sequence computed in one plain
prefill, teacher-forced: output token i must be what the reference picks at output index i
given the prompt and the engine's outputs before it. Checked alone, batched with other
requests, after a prefix-cache hit of the prompt (prompt tokens that never run through a step)
and after preemption by recompute and by swap (a new runner slot filled from prompt + outputs),
in the synchronous and the overlapped loop; nothing compiles while serving; a slot another
request used starts from the new request's own counts.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from engine_helpers import CompileCounter, run_engine

from jserve.kv_cache import allocate_kv_cache
from jserve.model.decoder import forward
from jserve.sampler import sample
from jserve.sampling_batch import SamplerFlags, SamplingRow, pack_sampling
from jserve.sampling_params import SamplingParams
from jserve.step_input import StepInput
from sharding import make_mesh

MODES = pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
MAX_LEN, PAGE, REF_ROWS = 128, 16, 32
REF_FLAGS = SamplerFlags(all_greedy=False, any_filters=True, history_width=MAX_LEN, max_logprobs=20)
PENALTY_PARAMS = (
    SamplingParams(temperature=0.0, repetition_penalty=1.8, max_tokens=20, ignore_eos=True),
    SamplingParams(temperature=0.0, presence_penalty=1.0, frequency_penalty=0.7, max_tokens=24,
                   ignore_eos=True, logprobs=2),
    SamplingParams(temperature=0.9, top_k=40, seed=5, repetition_penalty=1.3, frequency_penalty=0.4,
                   presence_penalty=-0.3, max_tokens=24, ignore_eos=True),
    SamplingParams(temperature=1.0, seed=8, repetition_penalty=0.7, max_tokens=12, ignore_eos=True),
)
PLAIN_PARAMS = (
    SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True),
    SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=10, ignore_eos=True),
)


def _prompts(n: int, seed: int) -> list[list[int]]:
    """Prompts over few distinct ids (repeats: the repetition penalty has work to do)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(5, 80, int(k)).tolist() for k in rng.integers(3, 60, n)]


class Reference:
    """The model's logits over a whole sequence (one prefill in its own pool) + the pure
    sampler over the packed history."""

    def __init__(self, engine) -> None:
        self.cfg, self.params = engine.config.model, engine.runner.params
        self.kv = allocate_kv_cache(self.cfg, MAX_LEN // PAGE + 1, PAGE, "float32", make_mesh(1))
        self._logits = jax.jit(lambda p, k, b: forward(self.cfg, p, k, b)[1])
        self._sample = jax.jit(sample, static_argnames=("flags",))

    def logits(self, seq: list[int]) -> np.ndarray:
        n, pos = len(seq), np.arange(MAX_LEN, dtype=np.int32)
        real = pos < n
        ids = np.zeros(MAX_LEN, np.int32)
        ids[:n] = seq
        batch = StepInput(
            token_ids=ids, positions=np.where(real, pos, 0),
            slot_mapping=np.where(real, PAGE + pos, 0).astype(np.int32),  # pages 1, 2, ... in order
            page_table=np.arange(1, MAX_LEN // PAGE + 1, dtype=np.int32)[None],
            seq_lens=np.array([n], np.int32), query_start_loc=np.array([0, n], np.int32),
            num_seqs=np.array([1], np.int32), logits_indices=np.minimum(pos, n - 1))
        return np.asarray(self._logits(self.params, self.kv, batch))

    def check(self, prompt: list[int], sp: SamplingParams, seed: int, tokens: list[int]) -> None:
        p, k = len(prompt), len(tokens)
        assert k <= REF_ROWS
        logits = np.zeros((REF_ROWS, self.cfg.vocab_size), np.float32)
        logits[:k] = self.logits(prompt + tokens[:-1])[p - 1:p - 1 + k]
        rows = [SamplingRow(sp, seed, i, prompt, tokens[:i]) for i in range(k)]
        batch, flags = pack_sampling(rows, REF_ROWS, self.cfg.vocab_size, flags=REF_FLAGS)
        want = np.asarray(self._sample(logits, batch, flags).token_ids[:k]).tolist()
        assert tokens == want, f"{sp}: engine {tokens} != reference {want}"


def _state_row(engine, rid: str) -> np.ndarray:
    """The penalty-state row of a request the runner still holds (finished ones until the next
    step drops them)."""
    slot = engine.runner.rows.slot_of(rid)
    assert slot is not None
    return np.asarray(engine.runner.penalty_state[slot])


def _expected_row(vocab: int, prompt: list[int], output: list[int]) -> np.ndarray:
    row = np.zeros(vocab, np.int32)
    row[prompt] = 1
    np.add.at(row, np.asarray(output, int), 2)
    return row


def _run_checked(engine, ref: Reference, items, vocab: int) -> list:
    """Serve ``items`` (no compile allowed), then check every penalty request against the
    reference, and its device state row while the runner still holds it (always for the last
    request to finish). -> the token lists, in order."""
    with CompileCounter() as counter:
        outs = run_engine(engine, items)
    assert counter.count == 0, f"{counter.count} compilations while serving"
    tokens = [o.outputs[0].token_ids for o in outs]
    held = 0
    for (prompt, sp), o, toks in zip(items, outs, tokens, strict=True):
        if sp.uses_penalties:
            ref.check(prompt, sp, sp.seed or 0, toks)
            if engine.runner.rows.slot_of(o.request_id) is not None:
                held += 1
                np.testing.assert_array_equal(_state_row(engine, o.request_id),
                                              _expected_row(vocab, prompt, toks))
    assert held or not any(sp.uses_penalties for _, sp in items) or len(items) > 1
    return tokens


@pytest.fixture(scope="module")
def engines(make_engine):
    return {overlap: make_engine("llama", async_scheduling=overlap) for overlap in (False, True)}


@pytest.fixture(scope="module")
def ref(engines):
    return Reference(engines[False])


@MODES
def test_alone_and_batched_equal_the_reference(engines, ref, overlap):
    engine = engines[overlap]
    vocab = engine.config.model.vocab_size
    prompts = _prompts(6, seed=1)
    items = [(prompts[i], sp) for i, sp in enumerate(PENALTY_PARAMS)]
    items += [(prompts[4 + i], sp) for i, sp in enumerate(PLAIN_PARAMS)]
    alone = [_run_checked(engine, ref, [item], vocab)[0] for item in items]
    batched = _run_checked(engine, ref, items, vocab)
    assert batched == alone
    # The penalties did change the tokens (the test can tell).
    greedy = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    assert run_engine(engine, [(prompts[0], greedy)])[0].outputs[0].token_ids != alone[0]


@MODES
def test_prefix_cache_hit_of_the_prompt(engines, ref, overlap):
    """The cached prompt pages are never computed again: the penalty state still knows the
    prompt (sent once when the request takes its slot)."""
    engine = engines[overlap]
    prompt = np.random.default_rng(10 + overlap).integers(5, 80, 50).tolist()  # 3 full pages
    warm = run_engine(engine, [(prompt, PLAIN_PARAMS[0])])[0]
    assert warm.num_cached_tokens == 0
    items = [(prompt, PENALTY_PARAMS[0]), (prompt, PENALTY_PARAMS[2])]
    _run_checked(engine, ref, items[:1], engine.config.model.vocab_size)
    with CompileCounter() as counter:
        outs = run_engine(engine, items)
    assert counter.count == 0
    assert all(o.num_cached_tokens >= 48 for o in outs)
    for (p, sp), o in zip(items, outs, strict=True):
        ref.check(p, sp, sp.seed or 0, o.outputs[0].token_ids)


@pytest.mark.parametrize("mode", ["recompute", "swap"])
@MODES
def test_preemption_equals_the_reference(make_engine, ref, mode, overlap):
    # 12 usable pages of 16 tokens: 8 requests of up to 60 + 24 tokens cannot all fit.
    engine = make_engine("llama", num_pages=13, preemption_mode=mode, async_scheduling=overlap)
    prompts = _prompts(8, seed=2)
    # frequency / presence penalties: a resumed request's outputs must be in its new slot
    items = [(p, PENALTY_PARAMS[1 + i % 2]) for i, p in enumerate(prompts)]
    resumed, dispatch = [], engine.runner.dispatch

    def spy(out):
        resumed.extend(c.req_id for c in out.chunks if c.new is not None and c.new.history
                       and len(c.new.history) > c.new.num_prompt)
        return dispatch(out)

    engine.runner.dispatch = spy
    _run_checked(engine, ref, items, engine.config.model.vocab_size)
    assert engine.kv_cache_stats()[f"preemptions_{mode}"] > 0
    assert resumed, "no request resumed with outputs already generated"


def test_a_reused_slot_starts_from_the_new_request(engines, ref):
    engine = engines[False]
    vocab = engine.config.model.vocab_size
    a, b = _prompts(2, seed=3)
    run_engine(engine, [(a, PENALTY_PARAMS[1])])
    engine.step()  # the runner drops a: its slot is free, its counts are still in the row
    slot = engine.runner.rows._free[-1]
    assert np.asarray(engine.runner.penalty_state[slot]).any()
    out = run_engine(engine, [(b, PENALTY_PARAMS[0])])[0]
    assert engine.runner.rows.slot_of(out.request_id) == slot  # b took a's slot
    toks = out.outputs[0].token_ids
    ref.check(b, PENALTY_PARAMS[0], 0, toks)
    np.testing.assert_array_equal(_state_row(engine, out.request_id), _expected_row(vocab, b, toks))


@pytest.mark.skipif(len(jax.devices()) < 2, reason="needs 2 devices (XLA_FLAGS host count)")
def test_flash_prefill_variant_under_tp2(make_engine, ref):
    """A step of fresh prompts (the flash-prefill variant) samples their first tokens from the
    penalty state too, and the state works replicated over a tp=2 mesh."""
    engine = make_engine("llama", tensor_parallel_size=2, flash_prefill_min_tokens=16)
    assert len(engine.runner.penalty_state.sharding.device_set) == 2
    calls, compiled = [], engine.runner._compiled
    for key, fn in list(compiled.items()):
        def counted(*a, _fn=fn, _key=key):
            calls.append(_key)
            return _fn(*a)
        compiled[key] = counted
    prompts = [p for p in _prompts(12, seed=4) if len(p) >= 20][:3]
    items = [(p, PENALTY_PARAMS[i]) for i, p in enumerate(prompts)]
    _run_checked(engine, ref, items, engine.config.model.vocab_size)
    assert any(v.fresh_prefill for v in calls), "no step took the flash variant"
