"""Chained verify rows: draft-model speculation in the overlapped loop (jserve/spec/chain.py).

While step N is in flight the scheduler plans the request's next row as if none of N's drafts
were accepted: ``[placeholder, d_1 .. d_K]`` with the drafts the draft model made in step N on
the device, and the device moves the row by N's accepted count. Checked here: the host's
bookkeeping by hand (start, pages, ``spec_in_flight`` and the rollback, no model); the runner's
packing of feed indices and shift fields; and, on the bundled pair (a draft that is right about
half the time, so rows move by every count from 0 to K), that the overlapped loop's tokens equal
the synchronous loop's for greedy and seeded random rows, up to ``max_model_len``, with no
page left behind.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from jserve.builder import EngineArgs, build_engine
from jserve.config import SchedulerConfig
from jserve.page_pool import PagePool
from jserve.request import Request
from jserve.sampling_params import SamplingParams
from jserve.scheduler import Scheduler
from jserve.scheduler_output import RunnerOutput, ScheduledChunk
from jserve.spec import chain
from jserve.spec.config import SpeculativeConfig
from jserve.spec.verify_step import SpecStepHandle
from jserve.step_buffers import StepLayout

K = 3
PS = 4


def _sched(max_model_len: int = 64) -> Scheduler:
    spec = SpeculativeConfig(method="draft_model", num_speculative_tokens=K, model="code-draft",
                             disable_by_batch_size=None)   # every step drafts
    cfg = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=32, max_model_len=max_model_len)
    return Scheduler(cfg, PagePool(40, PS), spec)


def _out(sched_out, tokens: list[int]) -> RunnerOutput:
    (c,) = sched_out.chunks
    return RunnerOutput([tokens if c.samples else []], draft_token_ids=[[0] * K])


def test_the_next_row_is_planned_as_if_no_draft_was_accepted():
    s = _sched()
    r = Request("a", list(range(10, 16)), SamplingParams(max_tokens=40, ignore_eos=True))
    s.add_request(r)
    n0 = s.schedule()                       # prefill 6 tokens, samples
    (c0,) = n0.chunks
    assert (c0.start, c0.num_tokens, c0.num_draft) == (0, 6, 0)
    n1 = s.schedule()                       # step 0 in flight: [placeholder, 3 device drafts]
    (c1,) = n1.chunks
    assert (c1.start, c1.num_tokens, c1.num_placeholders, c1.num_draft) == (6, 4, 1, K)
    assert c1.device_drafts and not c1.shifted and c1.token_ids == ()
    assert r.num_computed_tokens == 10 and r.spec_in_flight == K
    s.update(n0, _out(n0, [100]))           # step 0's token lands
    n2 = s.schedule()                       # step 1 in flight: moved by its accepted count
    (c2,) = n2.chunks
    assert c2.shifted and c2.device_drafts and c2.start == 7 and c2.output_index == 2
    assert r.num_computed_tokens == 14 and r.spec_in_flight == 2 * K
    assert len(r.page_ids) >= s.pool.pages_needed(14 + K)   # room for all accepted + lookahead
    s.update(n1, _out(n1, [101, 102, 103]))   # 2 of 3 drafts accepted: roll back 1
    assert (r.num_tokens, r.num_computed_tokens, r.spec_in_flight) == (10, 13, K)
    assert r.spec_num_accepted_tokens == 2
    s.update(n2, _out(n2, [104]))           # none accepted
    assert (r.num_tokens, r.num_computed_tokens, r.spec_in_flight) == (11, 10, 0)
    assert len(r.page_ids) == s.pool.pages_needed(10)
    assert r.output_token_ids == [100, 101, 102, 103, 104]


@pytest.mark.parametrize("host_masks", [False, True])
def test_a_row_read_before_planning_keeps_the_drafts_missing_place(host_masks):
    """A row that accepted every draft proposes K - 1 and a last -1 (draft.draft_step). Planned
    after its step was read (the synchronous loop), the next row still verifies K places, the
    -1 among them, as a row chained while the step was in flight does: the draft forward puts
    its emitted token there, so both loops draft alike (seeded samples equal). Rows whose host
    masks follow the drafts take the real ones only."""
    s = _sched()
    sp = SamplingParams(max_tokens=40, ignore_eos=True, bad_words=["x"] if host_masks else None)
    r = Request("a", list(range(10, 16)), sp)
    s.add_request(r)
    n0 = s.schedule()
    # the step's one host output: tokens [1, K + 1], emitted, verified, next drafts [1, K]
    host = np.array([100, 0, 0, 0, 1, 0, 7, 8, -1], np.int32)
    out = SpecStepHandle(n0, host, K, None, (0,), True).result()
    assert out.sampled_token_ids == [[100]] and out.draft_token_ids == [[7, 8, -1]]
    s.update(n0, out)
    (c1,) = s.schedule().chunks
    want = (7, 8) if host_masks else (7, 8, -1)
    assert c1.token_ids == (100, *want) and c1.num_draft == len(want) and not c1.device_drafts
    assert r.spec_in_flight == len(want)


def test_a_row_that_could_pass_max_model_len_waits_for_the_result():
    s = _sched(max_model_len=10)
    r = Request("a", list(range(10, 16)), SamplingParams(max_tokens=None, ignore_eos=True))
    s.add_request(r)
    n0 = s.schedule()
    n1 = s.schedule()                       # 6 + 1 + 3 drafts: all accepted reaches 10
    (c1,) = n1.chunks
    assert c1.num_draft == K and r.num_computed_tokens == 10
    s.update(n0, _out(n0, [100]))
    n2 = s.schedule()                       # the next row could start at 10: not scheduled
    assert not n2.chunks
    s.update(n1, _out(n1, [101]))           # none accepted
    n3 = s.schedule()                       # known again: the scheduler's own (host) drafts
    (c3,) = n3.chunks
    assert not c3.shifted and not c3.device_drafts and c3.start == 7
    assert c3.num_draft == 2 and c3.start + c3.num_tokens <= 10


def test_a_row_whose_draft_count_depends_on_the_result_waits_for_it():
    # Near max_tokens (or max_model_len) the synchronous loop drafts min(K, what is left) for
    # the tokens it knows; a row chained behind an in-flight verify row would have to guess
    # them (its draft count, hence how its seeded samples are drawn, would differ): it waits.
    s = _sched()
    r = Request("a", list(range(10, 16)), SamplingParams(max_tokens=8, ignore_eos=True))
    s.add_request(r)
    n0 = s.schedule()
    n1 = s.schedule()                       # 1 out (in flight) + K drafts: chained
    (c1,) = n1.chunks
    assert c1.device_drafts and c1.num_draft == K
    s.update(n0, _out(n0, [100]))
    n2 = s.schedule()                       # 2 out + K (if all accepted) + K more >= 8: waits
    assert not n2.chunks                    # (the synchronous loop drafts min(K, 5 - accepted))
    s.update(n1, _out(n1, [101, 102]))      # 1 of K accepted: 3 tokens out
    n3 = s.schedule()                       # known again: min(K, 8 - 3 - 1) drafts on the host
    (c3,) = n3.chunks
    assert not c3.shifted and not c3.device_drafts and c3.num_draft == K


def test_pack_feeds_device_drafts_and_marks_moved_rows():
    layout = StepLayout(num_tokens=16, num_rows=4, pages_per_seq=8, page_size=PS)
    _, _, f = layout.new_buffers()
    chunks = [ScheduledChunk("x", 5, 3, (1, 2, 3)),
              ScheduledChunk("a", 9, 1 + K, (), num_placeholders=1, samples=True, num_draft=K,
                             device_drafts=True, shifted=True),
              ScheduledChunk("b", 4, 1, (), num_placeholders=1, samples=True, shifted=True)]
    ends = [3, 3 + 1 + K, 3 + 1 + K + 1]
    num_out = 4
    chain.pack_chained(f, chunks, ends, [(1, 2), (2, 0)], num_out, K)
    assert f["prev_index"][4:7].tolist() == [num_out + 2 * K + j for j in range(K)]
    assert f["shift_row"][:3].tolist() == [-1, 2, 0]
    assert f["token_row"][:8].tolist() == [-1, -1, -1, 1, 1, 1, 1, 2]


@pytest.fixture(scope="module")
def pair_engines(xla_cache_dir):
    """The bundled code-small with code-draft, overlapped and synchronous (the second build
    hits the first one's compilation cache)."""
    args = dict(model="code-small", max_num_seqs=4, max_num_batched_tokens=64, max_model_len=96,
                compilation_cache_dir=xla_cache_dir,
                speculative_config={"method": "draft_model", "model": "code-draft",
                                    "num_speculative_tokens": 4,   # every request may draft:
                                    "disable_by_batch_size": 8})   # 5 arrive at once
    return (build_engine(EngineArgs(async_scheduling=True, **args)),
            build_engine(EngineArgs(async_scheduling=False, **args)))


def _generate(engine, items) -> tuple[list, Counter]:
    rows = Counter()
    orig = engine.scheduler.schedule

    def schedule():
        out = orig()
        for c in out.chunks:
            rows["device_drafts"] += c.device_drafts
            rows["shifted"] += c.shifted
            rows["accepted"] = engine.scheduler.spec_counters["spec_decode_num_accepted_tokens"]
        return out

    engine.scheduler.schedule = schedule
    try:
        for i, (prompt, sp) in enumerate(items):
            engine.add_request(str(i), prompt, sp)
        done = {}
        while engine.has_unfinished_requests():
            for o in engine.step():
                if o.finished:
                    done[o.request_id] = [c.token_ids for c in o.outputs]
    finally:
        engine.scheduler.schedule = orig
    return [done[str(i)] for i in range(len(items))], rows


def test_overlapped_chained_rows_equal_the_synchronous_loop(pair_engines):
    overlapped, sync = pair_engines
    prompts = ["def fibonacci(n):\n", "import os\nimport sys\n\ndef main():\n",
               "class Stack:\n    def __init__(self):\n", "for i in range(10):\n"]
    items = [(prompts[0], SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)),
             (prompts[1], SamplingParams(temperature=1.0, seed=3, max_tokens=33, ignore_eos=True)),
             (prompts[2], SamplingParams(temperature=0.8, top_p=0.9, seed=5, max_tokens=None,
                                         ignore_eos=True)),          # runs to max_model_len
             (prompts[3], SamplingParams(temperature=0.0, max_tokens=37, n=2, ignore_eos=True))]
    got, rows = _generate(overlapped, items)
    want, sync_rows = _generate(sync, items)
    assert got == want
    assert rows["device_drafts"] > 10 and rows["shifted"] > 10 and rows["accepted"] > 0
    assert sync_rows["device_drafts"] == 0
    n_prompt = len(overlapped.tokenize_prompt(prompts[2])[1])
    assert len(got[2][0]) == 96 - n_prompt
    assert [len(t) for t in got[0] + got[1] + got[3]] == [40, 33, 37, 37]
    assert overlapped.scheduler.kv.pool.num_used == 0
    assert np.all([r.spec_in_flight == 0 for r in overlapped.scheduler.running])


def test_aborts_and_recompute_preemption_while_chained_rows_are_in_flight(make_engine):
    """A self-draft (accepted almost always: rows move by K) on a pool small enough to preempt
    by recompute. One request is aborted while its chained row is in flight, another stops on
    a stop token found inside accepted drafts: the others' tokens equal the synchronous
    engine's, and every page comes back."""
    from fixture_paths import GOLDEN

    draft = {"method": "draft_model", "model": str(GOLDEN / "llama"), "num_speculative_tokens": 3,
             "disable_by_batch_size": None}
    eng = make_engine("llama", num_pages=12, preemption_mode="recompute", speculative_config=draft)
    sync = make_engine("llama", num_pages=12, preemption_mode="recompute", speculative_config=draft,
                       async_scheduling=False)
    rng = np.random.default_rng(9)
    prompts = [rng.integers(5, 500, n).tolist() for n in (30, 22, 41, 17, 26)]
    sp = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    want, _ = _generate(sync, [(p, sp) for p in prompts])
    stop_at = want[1][0][12]   # request 1 stops on its 13th token (often inside accepted drafts)
    items = [(p, sp) for p in prompts]
    items[1] = (prompts[1], SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True,
                                           stop_token_ids=[stop_at]))
    for i, (p, s) in enumerate(items):
        eng.add_request(str(i), p, s)
    done, steps = {}, 0
    while eng.has_unfinished_requests():
        steps += 1
        for o in eng.step():
            if o.finished:
                done[o.request_id] = [c.token_ids for c in o.outputs]
        if steps == 6:
            eng.abort_request("3")   # its next (chained) row is already planned and in flight
    assert eng.scheduler.num_preemptions_total > 0
    assert "3" not in done or len(done["3"][0]) < 40
    first_stop = want[1][0].index(stop_at)
    assert done["1"][0] == want[1][0][:first_stop + 1]
    for i in (0, 2, 4):
        assert done[str(i)] == want[i]
    assert eng.scheduler.kv.pool.num_used == 0


def test_shift_rows_moves_positions_slots_lengths_and_output_index():
    """The device half by hand: row 1 follows an out row that accepted 2 drafts; row 0 is not
    moved. Its tokens' positions, KV slots (from its page-table row), its sequence length and
    output index move by 2; row 0's stay as packed. ``prev_output`` leaves what it reads."""
    import jax.numpy as jnp

    from jserve.sampling_batch import SamplingBatch
    from jserve.step_input import StepInput

    num_out, k = 4, 3
    layout = StepLayout(num_tokens=8, num_rows=4, pages_per_seq=4, page_size=PS)
    ibuf, _, f = layout.new_buffers()
    f["shift_row"][1] = 2                      # row 1 follows out row 2 of the previous step
    f["token_row"][3:7] = 1                    # its 4 tokens
    prev = chain.prev_output(jnp.array([7, 8, 9, 0]), jnp.arange(12).reshape(4, 3) + 100,
                             jnp.array([1, 1, 3, 1]), jnp.array([0, 0, 3, 0]), num_out)
    assert prev.shape == (chain.prev_size(num_out, k),)
    assert prev[:4].tolist() == [7, 8, 9, 0]
    assert prev[num_out + 2 * k:num_out + 3 * k].tolist() == [106, 107, 108]
    assert prev[num_out * (k + 1):].tolist() == [0, 0, 2, 0]          # accepted counts
    pos = jnp.array([0, 1, 2, 9, 10, 11, 12, 0], jnp.int32)
    table = jnp.array([[1, 2, 3, 0], [5, 6, 7, 8], [0] * 4, [0] * 4], jnp.int32)
    batch = StepInput(token_ids=jnp.zeros(8, jnp.int32), positions=pos,
                      slot_mapping=jnp.full(8, -5, jnp.int32), page_table=table,
                      seq_lens=jnp.array([3, 13, 0, 0], jnp.int32),
                      query_start_loc=jnp.array([0, 3, 7, 7, 7], jnp.int32),
                      num_seqs=jnp.array([2], jnp.int32), logits_indices=jnp.array([2, 6, 0, 0]))
    z = jnp.zeros(4)
    sbatch = SamplingBatch(temperature=z, top_k=z, top_p=z, min_p=z, repetition_penalty=z,
                           presence_penalty=z, frequency_penalty=z, seed=jnp.zeros((4, 2), jnp.uint32),
                           output_index=jnp.array([0, 5, 0, 0], jnp.int32), banned_ids=None,
                           history_ids=None, num_prompt=None, want_logprobs=z > 0)
    b, s = chain.shift_rows(layout, jnp.asarray(ibuf), batch, sbatch, prev, num_out, k)
    moved = [11, 12, 13, 14]
    assert b.positions.tolist() == [0, 1, 2, *moved, 0]
    slots = [table[1, p // PS] * PS + p % PS for p in moved]
    assert b.slot_mapping.tolist() == [-5, -5, -5, *[int(x) for x in slots], -5]
    assert b.seq_lens.tolist() == [3, 15, 0, 0] and s.output_index.tolist() == [0, 7, 0, 0]
    assert b.token_ids.tolist() == [0] * 8 and b.query_start_loc.tolist() == [0, 3, 7, 7, 7]
