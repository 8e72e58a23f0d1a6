"""Data parallelism: N engine replicas on disjoint devices behind one engine API.

Where it sits: ``build_engine`` with ``data_parallel_size=N`` builds N ordinary ``LLMEngine``s,
replica i on devices ``[i*tp, (i+1)*tp)`` (its own mesh, params, KV pool and compiled steps),
and returns a ``DataParallelEngine``: the same narrow API (add / abort / step / stats /
startup), so ``LLM``, ``AsyncEngine`` and the server need no change::

    add_request --PrefixRouter(prompt prefix, loads)--> replica i .add_request
    step()      --> every replica with work steps, each on its own host thread (a replica's
                    wait for its previous step's tokens does not hold up the others' dispatch,
                    so every device stays fed) --> their outputs, concatenated

Routing (``PrefixRouter``): a request goes to the replica that last took a request sharing
the longest prefix of its prompt (its pages are likely in that replica's prefix cache), unless
that replica carries more than ``slack`` requests beyond the least loaded one; otherwise to the
least loaded (running + waiting). Prefixes are remembered at a few fixed lengths (in characters
of a text prompt, tokens of an id prompt), salted by ``cache_salt`` like the prefix cache.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from jserve.config import EngineConfig
from jserve.engine import LLMEngine, Prompt
from jserve.engine_api import EngineStats, StartupInfo
from jserve.outputs import RequestOutput
from jserve.sampling_params import SamplingParams
from jserve.tokenizer import Tokenizer

PREFIX_LENGTHS = (32, 128, 512, 2048)


class PrefixRouter:
    """Replica choice by prefix affinity and load (see the module docstring)."""

    def __init__(self, num_replicas: int, slack: int, capacity: int = 65536,
                 prefix_lengths: Sequence[int] = PREFIX_LENGTHS) -> None:
        if num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
        self.num_replicas = num_replicas
        self.slack = slack
        self.capacity = capacity
        self.prefix_lengths = tuple(prefix_lengths)
        self._last: OrderedDict[int, int] = OrderedDict()   # prefix key -> replica
        self._turn = 0                                      # breaks load ties round-robin

    def _keys(self, prompt: Prompt, salt: str | None) -> list[int]:
        seq = prompt if isinstance(prompt, str) else tuple(prompt)
        lengths = [n for n in self.prefix_lengths if len(seq) >= n] or [len(seq)]
        return [hash((salt, isinstance(prompt, str), seq[:n])) for n in lengths]

    def route(self, prompt: Prompt, loads: Sequence[int], salt: str | None = None) -> int:
        """-> the replica for ``prompt`` given each replica's current load."""
        if len(loads) != self.num_replicas:
            raise ValueError(f"route: {len(loads)} loads for {self.num_replicas} replicas")
        keys = self._keys(prompt, salt)
        low = min(loads)
        order = [(self._turn + k) % self.num_replicas for k in range(self.num_replicas)]
        least = next(i for i in order if loads[i] == low)
        choice = least
        for key in reversed(keys):   # longest known prefix first
            owner = self._last.get(key)
            if owner is not None:
                if loads[owner] <= low + self.slack:
                    choice = owner
                break
        if choice == least:
            self._turn = (least + 1) % self.num_replicas
        for key in keys:
            self._last[key] = choice
            self._last.move_to_end(key)
        while len(self._last) > self.capacity:
            self._last.popitem(last=False)
        return choice


class DataParallelEngine:
    """N ``LLMEngine`` replicas behind the engine API the front-ends use."""

    def __init__(self, replicas: Sequence[LLMEngine], router: PrefixRouter | None = None) -> None:
        if not replicas:
            raise ValueError("DataParallelEngine needs at least one replica")
        self.replicas = list(replicas)
        first = self.replicas[0]
        self.config: EngineConfig = first.config
        self.tokenizer: Tokenizer | None = first.tokenizer
        self.eos_token_ids = first.eos_token_ids
        self.router = router or PrefixRouter(len(self.replicas),
                                             slack=max(1, first.config.scheduler.max_num_seqs // 2))
        self._owner: dict[str, int] = {}
        self._ids = itertools.count()
        self._pool = ThreadPoolExecutor(max_workers=len(self.replicas), thread_name_prefix="jserve-dp")
        s = first.startup
        pages = sum(r.startup.pool_plan.num_pages - 1 for r in self.replicas) + 1
        self._startup = dataclasses.replace(
            s, pool_plan=dataclasses.replace(s.pool_plan, num_pages=pages),
            max_model_len=min(r.max_model_len for r in self.replicas),
            max_num_seqs=sum(r.startup.max_num_seqs for r in self.replicas),
            startup_seconds=max(r.startup.startup_seconds for r in self.replicas),
            compile_seconds=sum(r.startup.compile_seconds for r in self.replicas))

    # ------------------------------------------------------------------ requests
    def compile_grammar(self, params: SamplingParams) -> None:
        """``LLMEngine.compile_grammar`` on every replica (each keeps its own caches)."""
        for r in self.replicas:
            r.compile_grammar(params)

    def add_request(self, request_id: str | None, prompt: Prompt, params: SamplingParams,
                    arrival_time: float | None = None, cache_salt: str | None = None,
                    priority: int = 0) -> str:
        """Route and queue a request (``LLMEngine.add_request``'s contract and errors)."""
        if request_id is None:
            request_id = f"req-{next(self._ids)}"
        if request_id in self._owner:
            raise ValueError(f"request_id: {request_id!r} is already in use")
        loads = []
        for r in self.replicas:
            st = r.stats()
            loads.append(st.num_running + st.num_waiting)
        try:
            i = self.router.route(prompt, loads, cache_salt)
        except TypeError:   # not a prompt at all: replica 0's add_request names the problem
            i = 0
        rid = self.replicas[i].add_request(request_id, prompt, params, arrival_time, cache_salt,
                                           priority=priority)
        self._owner[rid] = i
        return rid

    def abort_request(self, request_id: str) -> None:
        i = self._owner.get(request_id)
        if i is not None:
            self.replicas[i].abort_request(request_id)

    def replica_of(self, request_id: str) -> int | None:
        """Which replica serves an unfinished request (tests, metrics)."""
        return self._owner.get(request_id)

    # ------------------------------------------------------------------ loop
    def has_unfinished_requests(self) -> bool:
        return any(r.has_unfinished_requests() for r in self.replicas)

    def step(self) -> list[RequestOutput]:
        """One step of every replica that has work, concurrently (one thread per replica;
        the call returns when all have stepped, so requests are never added mid-step)."""
        busy = [r for r in self.replicas if r.has_unfinished_requests()]
        if len(busy) == 1:
            results = [busy[0].step()]
        else:
            results = [f.result() for f in [self._pool.submit(r.step) for r in busy]]
        outputs: list[RequestOutput] = []
        for outs in results:
            for out in outs:
                if out.finished:
                    self._owner.pop(out.request_id, None)
                outputs.append(out)
        return outputs

    # ------------------------------------------------------------------ narrow API
    @property
    def max_model_len(self) -> int:
        return self._startup.max_model_len

    @property
    def startup(self) -> StartupInfo:
        """Replica 0's facts with pages and sequences summed over the replicas."""
        return self._startup

    def kv_cache_stats(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for r in self.replicas:
            for k, v in r.kv_cache_stats().items():
                total[k] = total.get(k, 0) + v
        return total

    def reset_prefix_cache(self) -> int:
        return sum(r.reset_prefix_cache() for r in self.replicas)

    def stats(self) -> EngineStats:
        """Every replica's snapshot, summed."""
        parts = [r.stats() for r in self.replicas]
        kv: dict[str, int] = {}
        for p in parts:
            for k, v in p.kv_cache.items():
                kv[k] = kv.get(k, 0) + v
        return EngineStats(num_running=sum(p.num_running for p in parts),
                           num_waiting=sum(p.num_waiting for p in parts),
                           kv_pages_used=sum(p.kv_pages_used for p in parts),
                           kv_pages_free=sum(p.kv_pages_free for p in parts),
                           kv_pages_total=sum(p.kv_pages_total for p in parts),
                           num_preemptions_total=sum(p.num_preemptions_total for p in parts),
                           kv_cache=kv)
