"""DeviceGrammars: the engine's requests whose grammar runs on the device as a token automaton.

Where it sits: owned by ``LLMEngine`` beside the ``ConstraintTracker`` (the host path). At
``add_request`` a request with ``structured_outputs`` (and no ``bad_words``) whose spec compiles
to a small enough token automaton (jserve/structured/automaton.py) takes it from the runner's
``AutomatonPool`` instead of an llguidance matcher; its start state goes to the runner with the
request's slot (``Request.fsm_state`` -> ``NewRequestData.fsm_state``), and from there the step
programs mask and advance it on the device (jserve/structured/automaton_step.py). The engine
loop treats the request as a free row: no mask per step, no read before the next launch::

    compile_grammar (front-ends, off the engine thread; LLM.generate before its adds): compile
        the spec's automaton into the compiler's cache (outlines-core: ~0.1 s at 8k tokens, ~5-7 s
        at 152k, in a child process from 32k ids: jserve/structured/automaton_worker.py)
    add_request (engine thread, never compiles) --compiled?--> acquire -> Request.fsm_state
        (not compiled yet: compiled on a helper thread for later requests; this one takes the
        host path)
    step N tokens read (``LLMEngine._read``) --advance--> walk the host mirror of the table
        -> Request.fsm_state (what a resumed request's slot is written with)
        -> requests to end: the output is complete (only EOS may follow: stopped, as the host
           path's matcher stops), or a token the automaton refuses (aborted, with a warning)
    request released --> the pool's user count drops (its rows stay loaded for the next)

Everything else (grammars, any JSON object, specs outlines-core does not enforce, a full pool,
speculative engines, requests with ``bad_words``) keeps the host path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from jserve.request import Request
from jserve.sampling_params import SamplingParams
from jserve.structured.automaton import AutomatonCompiler
from jserve.structured.automaton_pool import AutomatonPool

log = logging.getLogger(__name__)


class DeviceGrammars:
    """Requests on the device automata, by id: their spec key and the outputs walked so far."""

    def __init__(self, pool: AutomatonPool, compiler: Callable[[], AutomatonCompiler]) -> None:
        self.pool = pool
        self._compiler = compiler     # built on first use (it needs the grammar tokenizer)
        self._keys: dict[str, tuple] = {}
        self._walked: dict[str, int] = {}   # output tokens walked per request
        self.errors: dict[str, str] = {}
        self._thread: ThreadPoolExecutor | None = None   # compiles for ``add`` (first use)
        self._building: dict[tuple, Future] = {}

    def compile(self, params: SamplingParams) -> bool:
        """Compile ``params``' automaton into the compiler's cache (thread-safe; blocks) ->
        whether the request can run on the device."""
        if params.structured_outputs is None or params.bad_words:
            return False
        return self._compiler().compile(params.structured_outputs.key) is not None

    def _build_later(self, key: tuple) -> None:
        """Compile ``key`` on the helper thread (once), for the requests after this one."""
        if key not in self._building:
            if self._thread is None:
                self._thread = ThreadPoolExecutor(1, thread_name_prefix="jserve-automata")
            self._building[key] = self._thread.submit(self._compiler().compile, key)
            self._building[key].add_done_callback(lambda _: self._building.pop(key, None))

    def add(self, req: Request) -> bool:
        """Put ``req`` on a device automaton (its start state in ``req.fsm_state``) -> False when
        it stays on the host path (not compilable, not compiled yet, or the pool is full)."""
        params = req.sampling_params
        if params.structured_outputs is None or params.bad_words:
            return False
        key = params.structured_outputs.key
        ready, automaton = self._compiler().peek(key)
        if not ready:
            self._build_later(key)
        start = None if automaton is None else self.pool.acquire(key, automaton)
        if start is None:
            return False
        req.fsm_state = start
        self._keys[req.request_id] = key
        self._walked[req.request_id] = 0
        return True

    def remove(self, req_id: str) -> None:
        key = self._keys.pop(req_id, None)
        if key is not None:
            self.pool.release(key)
            self._walked.pop(req_id, None)
            self.errors.pop(req_id, None)

    def __contains__(self, req_id: str) -> bool:
        return req_id in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def advance(self, reqs: list[Request]) -> list[str]:
        """Walk the new outputs of the updated requests on the host mirror -> ids of unfinished
        requests to end now: complete (only EOS may follow) or refused a token (``errors``)."""
        live = [r for r in reqs if r.request_id in self._keys and not r.is_finished]
        if not live:
            return []
        states = np.fromiter((r.fsm_state for r in live), np.int64, len(live))
        ended = []
        width = max(len(r.output_token_ids) - self._walked[r.request_id] for r in live)
        for j in range(width):   # one gather per token position (a decode step: one)
            idx, toks = [], []
            for i, r in enumerate(live):
                at = self._walked[r.request_id] + j
                if at < len(r.output_token_ids) and states[i] >= 0:
                    idx.append(i)
                    toks.append(r.output_token_ids[at])
            if idx:
                states[idx] = self.pool.advance(states[idx], np.asarray(toks, np.int64))
        for i, r in enumerate(live):
            rid = r.request_id
            self._walked[rid] = len(r.output_token_ids)
            r.fsm_state = int(states[i])
            if states[i] < 0:
                self.errors[rid] = f"token {r.output_token_ids[-1]} not allowed by the grammar"
                log.warning("request %s: the device grammar refused a sampled token: %s", rid,
                            self.errors[rid])
                ended.append(rid)
            elif self.pool.done[states[i]]:
                ended.append(rid)
        return ended
