"""The two schedulers of a disaggregated engine, without a model: the prefill scheduler holds a
request once its first token is sampled (even over an in-flight placeholder), detaching keeps
its pages and frees its runner slot, the decode scheduler runs it from its last token on; held
requests keep their pages, so admission waits until pages come back (back-pressure)."""

import pytest

from jserve.config import SchedulerConfig
from jserve.disagg.schedulers import DecodeScheduler, PrefillScheduler, is_prefilled
from jserve.kv_manager import KVCacheManager
from jserve.page_pool import PagePool
from jserve.request import Request, RequestStatus
from jserve.sampling_params import SamplingParams
from jserve.scheduler_output import RunnerOutput

CFG = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=8, max_model_len=64)
SP = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)


def _tokens(out, value=7):
    return RunnerOutput([[value] if c.samples else [] for c in out.chunks])


def test_prefill_holds_then_decode_continues():
    ps = PrefillScheduler(CFG, KVCacheManager(PagePool(20, 4)))
    ds = DecodeScheduler(CFG, KVCacheManager(PagePool(20, 4)))
    req = Request("a", list(range(1, 11)), SP)        # 10 tokens: chunks of 8 + 2
    ps.add_request(req)
    first = ps.schedule()
    assert [c.num_tokens for c in first.chunks] == [8]
    second = ps.schedule()                             # overlapped: first not read yet
    assert [(c.num_tokens, c.samples) for c in second.chunks] == [(2, True)]
    assert is_prefilled(req) and req.num_placeholders == 1
    assert ps.schedule().chunks == []                  # held: no decode row over the placeholder
    ps.update(first, _tokens(first))
    assert ps.prefilled() == []                        # its token is still in flight
    ps.update(second, _tokens(second))
    assert ps.prefilled() == [req] and req.output_token_ids == [7]
    pages = ps.detach(req)
    assert len(pages) == 3 and ps.pool.num_used == 3   # still allocated: the handoff frees them
    assert ps.schedule().dropped == ["a"]              # the prefill runner forgets its slot
    assert ds.has_room(3)
    req.page_ids = ds.pool.allocate(3)
    ds.admit_prefilled(req)
    out = ds.schedule()
    (c,) = out.chunks
    assert (c.start, c.num_tokens, c.token_ids, c.samples, c.num_placeholders) == (10, 1, (7,), True, 0)
    assert c.new is not None and c.page_ids == tuple(req.page_ids)   # the whole page row
    ds.update(out, _tokens(out, 9))
    assert req.output_token_ids == [7, 9]
    ps.pool.free(reversed(pages))
    ps.kv.check_invariants([])
    ds.kv.check_invariants([req])


def test_held_requests_keep_their_pages_until_they_leave():
    ps = PrefillScheduler(CFG, KVCacheManager(PagePool(6, 4)))   # 5 pages
    a, b = Request("a", list(range(1, 9)), SP), Request("b", list(range(20, 28)), SP)
    ps.add_request(a)
    out = ps.schedule()
    ps.update(out, _tokens(out))
    assert ps.prefilled() == [a]                       # 2 pages, held
    ps.add_request(b)
    out = ps.schedule()
    ps.update(out, _tokens(out))
    assert ps.prefilled() == [a, b]
    c = Request("c", list(range(30, 37)), SP)          # needs 2 pages, 1 free: waits
    ps.add_request(c)
    assert ps.schedule().chunks == [] and ps.num_waiting == 1
    ps.finish_request("a", RequestStatus.FINISHED_ABORTED)
    out = ps.schedule()
    assert [ch.req_id for ch in out.chunks] == ["c"]
    ps.update(out, _tokens(out))
    assert ps.prefilled() == [b, c]
    with pytest.raises(ValueError, match="not a prefilled running request"):
        ps.detach(a)


def test_decode_room_waits_for_preempted_requests_and_rows():
    ds = DecodeScheduler(CFG, KVCacheManager(PagePool(6, 4)))
    assert ds.has_room(5) and not ds.has_room(6)       # alone: every page may be taken
    r = Request("r", [1, 2, 3, 4, 5], SP, output_token_ids=[6])
    r.num_computed_tokens = 5
    r.page_ids = ds.pool.allocate(2)
    ds.admit_prefilled(r)
    assert ds.has_room(2) and not ds.has_room(3)      # one page kept for the next token
    with pytest.raises(ValueError, match="already scheduled"):
        ds.admit_prefilled(r)
