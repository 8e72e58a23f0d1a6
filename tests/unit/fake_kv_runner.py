"""A model-free runner for KV-manager tests: the "KV" of a token is its id.

``FakeKVRunner`` keeps a host copy of the paged pool (``int64[num_pages, page_size]``), makes
the step's page moves exactly in ``KVPageMover``'s order (gather to host, copy-on-write
copies, loads from host, then the chunks' writes; a gathered page goes into its host slot
when it is gathered, as in the mover), writes each chunk's token ids into its pages and
"samples" a hash of the context it reads back through the request's page table. A page
mix-up, a missed copy-on-write, a stale swap slot or a wrong prefix-cache hit therefore
changes the generated tokens, which the tests compare with ``reference_generation`` (the
same fake model run on the plain token list).
"""

from __future__ import annotations

import numpy as np

from jserve.host_kv import HostPageStore
from jserve.page_pool import PagePool
from jserve.request import Request, RequestStatus
from jserve.scheduler_output import RunnerOutput, SchedulerOutput

VOCAB = 48


def fake_model(context: np.ndarray | list[int], seed: int) -> int:
    """Deterministic next token from the whole context and the request's seed."""
    ctx = context.tolist() if isinstance(context, np.ndarray) else context
    return hash((seed, tuple(ctx))) % VOCAB


def host_store(num_slots: int, page_size: int, name: str = "host") -> HostPageStore:
    return HostPageStore(num_slots, (page_size,), np.int64, name)


class FakeKVRunner:
    def __init__(self, pool: PagePool) -> None:
        self.ps = pool.page_size
        self.kv = np.full((pool.num_pages, pool.page_size), -1, np.int64)
        self.num_copies = self.num_to_host = self.num_from_host = 0

    def run(self, out: SchedulerOutput) -> RunnerOutput:
        t = out.transfers
        for page, store, slot in t.to_host:
            store.put(slot, self.kv[page].copy())
        if t.copies:
            src, dst = zip(*t.copies, strict=True)
            self.kv[list(dst)] = self.kv[list(src)]
        for store, slot, page in t.from_host:
            self.kv[page] = store.get(slot)
        self.num_copies += len(t.copies)
        self.num_to_host += len(t.to_host)
        self.num_from_host += len(t.from_host)
        for c in out.chunks:  # the step writes all rows' K/V, then attends
            pos = np.arange(c.start, c.start + c.num_tokens)
            pages = np.asarray(c.request.page_ids)[pos // self.ps]
            assert (pages != 0).all(), "a real token must not write the null page"
            self.kv[pages, pos % self.ps] = [c.request.token_at(i) for i in pos]
        sampled = []
        for c in out.chunks:
            if not c.samples:
                sampled.append(VOCAB + 1)  # garbage: the scheduler must not keep it
                continue
            pos = np.arange(c.start + c.num_tokens)
            ctx = self.kv[np.asarray(c.request.page_ids)[pos // self.ps], pos % self.ps]
            sampled.append(fake_model(ctx, c.request.seed))
        return RunnerOutput(np.array(sampled, np.int32))


def reference_generation(r: Request, max_model_len: int) -> tuple[list[int], RequestStatus]:
    sp, toks, out = r.sampling_params, list(r.prompt_token_ids), []
    while True:
        t = fake_model(toks, r.seed)
        toks.append(t)
        out.append(t)
        if (sp.max_tokens is not None and len(out) >= sp.max_tokens) or len(toks) >= max_model_len:
            return out, RequestStatus.FINISHED_LENGTH
        if len(out) >= sp.min_tokens and ((not sp.ignore_eos and t in r.eos_token_ids)
                                          or t in sp.stop_token_ids):
            return out, RequestStatus.FINISHED_STOPPED
