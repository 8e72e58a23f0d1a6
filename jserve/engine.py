"""LLMEngine: the engine loop (add_request -> step -> RequestOutputs).

Where it sits: below ``LLM`` (offline API) and the async engine (server). One ``step()``
(overlapped: the device never waits for the host)::

    Scheduler.schedule() N+1 -> Runner.dispatch() N+1        (returns at once)
    StepHandle N .result() -> Scheduler.update(N)           (tokens of the previous step)
      -> per updated request: incremental detokenize, stop strings -> RequestOutput

With ``async_scheduling=False`` a step reads its own results (the synchronous reference).

Requests with ``n`` > 1 become n child ``Request``s (same prompt, distinct seeds) grouped
under one parent id. Validation errors are ``ValueError``s naming the field; they reject
only the offending request.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from jserve.config import EngineConfig
from jserve.detokenizer import IncrementalDetokenizer
from jserve.engine_api import BuildInfo, EngineStats, StartupInfo
from jserve.grammar_steps import Ahead, GrammarSteps
from jserve.kv_manager import make_kv_manager
from jserve.outputs import CompletionOutput, Logprob, RequestOutput
from jserve.prompt_logprobs import PromptScorer
from jserve.request import Request, RequestStatus
from jserve.runner import Runner, StepHandle
from jserve.sampling_batch import MAX_BANNED_IDS, banned_ids_fit
from jserve.sampling_params import RequestOutputKind, SamplingParams
from jserve.scheduler import Scheduler
from jserve.scheduler_output import SchedulerOutput
from jserve.spec.verify_step import SpecStepHandle
from jserve.stop_strings import StopStringMatcher
from jserve.structured.automaton import AutomatonCompiler, token_bytes
from jserve.structured.constraints import ConstraintTracker
from jserve.structured.device_grammars import DeviceGrammars
from jserve.structured.grammar import GrammarCache, make_ll_tokenizer
from jserve.tokenizer import Tokenizer

log = logging.getLogger(__name__)

Prompt = str | list[int]


@dataclass
class _Child:
    request: Request
    detok: IncrementalDetokenizer | None
    stops: StopStringMatcher | None
    text: str = ""
    num_seen: int = 0           # output tokens already turned into text / logprobs
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    cumulative_logprob: float = 0.0


@dataclass
class _Parent:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    children: list[_Child]
    arrival_time: float
    first_token_time: float | None = None
    scheduled_time: float | None = None      # first scheduled (queue time ends, prefill starts)
    prompt_logprobs: list | None = None      # PromptScorer.score's entries, when asked for


class LLMEngine:
    def __init__(self, config: EngineConfig, runner: Runner, tokenizer: Tokenizer | None,
                 num_pages: int, build: BuildInfo | None = None,
                 scheduler: Scheduler | None = None) -> None:
        """``scheduler``: one made by the caller (disaggregation's two-group scheduler,
        jserve/disagg/); default: one over a pool of ``num_pages``."""
        self.config = config
        self.tokenizer = tokenizer
        self.runner = runner
        if scheduler is None:
            scheduler = Scheduler(config.scheduler, make_kv_manager(config, num_pages), config.speculative)
        self.scheduler = scheduler
        scheduler.pipelined_bursts = config.pipelined_bursts
        self.pool = scheduler.pool
        self._parents: dict[str, _Parent] = {}
        self._child_to_parent: dict[str, str] = {}
        self._rng = np.random.default_rng(config.seed)
        self._ids = itertools.count()
        eos = config.model.eos_token_ids or (tokenizer.eos_token_ids if tokenizer else ())
        self.eos_token_ids: tuple[int, ...] = tuple(eos)
        # Start-up facts (banner, /metrics, jserve plan): ``build`` comes from builder.build_engine.
        self._startup = StartupInfo.create(build, config, num_pages, self.scheduler.max_model_len)
        self._overlap = config.scheduler.async_scheduling
        self._in_flight: StepHandle | None = None  # dispatched, results not yet read
        self._scorer: PromptScorer | None = None    # made on the first prompt_logprobs request
        self._last_step_tokens = 0                  # tokens of the last dispatched step (stats)
        self._aborted: dict[str, None] = {}         # parents aborted since the last outputs
        # Host-computed token masks (grammars, bad words): jserve/structured/constraints.py.
        self._grammar_cache: GrammarCache | None = None
        self._grammar_lock = threading.Lock()
        self.constraints = ConstraintTracker(
            self.grammar_cache, config.model.vocab_size,
            (lambda t: tokenizer.encode(t, add_special_tokens=False)) if tokenizer else None)
        self.grammar = GrammarSteps(self.constraints, scheduler, runner)   # their part of a step
        # Grammars run on the device as token automata (jserve/structured/device_grammars.py).
        self._automata: AutomatonCompiler | None = None
        self.device_grammars = (DeviceGrammars(runner.automata, self.automaton_compiler)
                                if runner.automata is not None else None)

    def grammar_cache(self) -> GrammarCache:
        """The grammar compiler of this model's tokenizer (built on first use, then cached;
        thread-safe)."""
        with self._grammar_lock:
            if self._grammar_cache is None:
                if self.tokenizer is None:
                    raise ValueError("structured_outputs: needs a tokenizer")
                size = self.tokenizer.vocab_size  # EOS ids the tokenizer knows (else its own)
                eos = tuple(t for t in self.eos_token_ids if t < size)
                ll = make_ll_tokenizer(self.tokenizer.to_json(), self.config.model.vocab_size, eos)
                self._grammar_cache = GrammarCache(ll)
            return self._grammar_cache

    def automaton_compiler(self) -> AutomatonCompiler:
        """The token-automaton compiler of this model (built on first use; thread-safe)."""
        cache = self.grammar_cache()
        with self._grammar_lock:
            if self._automata is None:
                v, states = self.config.model.vocab_size, self.device_grammars.pool.states
                # (the cache of compiled tables kept to ~1 GiB of host memory at the largest size)
                self._automata = AutomatonCompiler(token_bytes(cache.tokenizer, v), self.eos_token_ids,
                                                   v, states, capacity=max(4, (1 << 30) // (2 * v * states)),
                                                   tokenize=cache.tokenizer.tokenize_bytes)
            return self._automata

    def compile_grammar(self, params: SamplingParams) -> None:
        """Compile ``params``' grammar (and its token automaton, where the device runs it) into
        the caches (ValueError if it is bad). Thread-safe: front-ends call it off the engine
        thread, so ``add_request`` only hits the caches."""
        self.constraints.compile(params)
        if self.device_grammars is not None:
            self.device_grammars.compile(params)

    # ------------------------------------------------------------------ input
    def tokenize_prompt(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt: must not be empty")
            if self.tokenizer is None:
                raise ValueError("prompt: text prompts need a tokenizer; pass token ids")
            return prompt, self.tokenizer.encode(prompt)
        if not isinstance(prompt, (list, tuple)) or not all(
                isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in prompt):
            raise ValueError("prompt: must be a string or a list of token ids (ints)")
        ids = [int(t) for t in prompt]
        vocab = self.config.model.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt: token id {bad[0]} is out of range [0, {vocab})")
        return None, ids

    def truncate_prompt(self, ids: list[int], params: SamplingParams) -> list[int]:
        """The prompt's last ``params.truncate_prompt_tokens`` tokens (-1: max_model_len - 1)."""
        k = getattr(params, "truncate_prompt_tokens", None)   # validate() checks the type next
        if k is None:
            return ids
        if k == -1:
            k = self.config.scheduler.max_model_len - 1
        return ids[-k:]

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        max_len = self.config.scheduler.max_model_len
        if not prompt_ids:
            raise ValueError("prompt: must contain at least one token")
        if len(prompt_ids) >= max_len:
            raise ValueError(f"prompt: {len(prompt_ids)} tokens, but max_model_len is {max_len} "
                             f"(the prompt must leave room for at least one generated token)")
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params: expected SamplingParams, got {type(params).__name__}")
        vocab = self.config.model.vocab_size
        for t in params.stop_token_ids:
            if t >= vocab:
                raise ValueError(f"stop_token_ids: {t} is out of range [0, {vocab})")
        for name, ids in (("allowed_token_ids", params.allowed_token_ids or ()),
                          ("logit_bias", [t for t, _ in params.logit_bias or ()])):
            for t in ids:
                if t >= vocab:
                    raise ValueError(f"{name}: token id {t} is out of range [0, {vocab})")
        if not banned_ids_fit(params, self.eos_token_ids):
            raise ValueError(f"stop_token_ids: with min_tokens > 0 at most {MAX_BANNED_IDS} distinct "
                             "stop/eos ids are supported")

    def add_request(self, request_id: str | None, prompt: Prompt, params: SamplingParams,
                    arrival_time: float | None = None, cache_salt: str | None = None,
                    priority: int = 0) -> str:
        """Validate, tokenize and queue a request. Raises ValueError (bad input) or
        QueueFullError; nothing is queued on error. ``cache_salt``: requests share prefix-cached
        pages only with requests of the same salt. ``priority``: lower is admitted first."""
        if request_id is None:
            request_id = f"req-{next(self._ids)}"
        if request_id in self._parents:
            raise ValueError(f"request_id: {request_id!r} is already in use")
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise ValueError(f"priority: must be an integer, got {priority!r}")
        text, ids = self.tokenize_prompt(prompt)
        ids = self.truncate_prompt(ids, params)
        self.validate(ids, params)
        prompt_lps = (self._prompt_scorer().score(ids, params.prompt_logprobs)
                      if params.prompt_logprobs is not None else None)
        grammar = self.constraints.compile(params)  # cached per spec; ValueError if bad
        bad_words = self.constraints.bad_word_ids(params.bad_words)
        arrival = time.monotonic() if arrival_time is None else arrival_time
        base_seed = params.seed if params.seed is not None else int(self._rng.integers(0, 2**31))
        children = []
        for i in range(params.n):
            cid = request_id if params.n == 1 else f"{request_id}#{i}"
            req = Request(cid, ids, params, eos_token_ids=self.eos_token_ids,
                          seed=(base_seed + 0x9E3779B1 * i) % 2**32, arrival_time=arrival,
                          cache_salt=cache_salt, fork_of=children[0].request if children else None,
                          priority=priority)
            children.append(_Child(req, self._make_detok(ids, params), self._make_stops(params)))
        added: list[Request] = []
        try:
            if params.uses_host_masks:
                for ch in children:
                    dg = self.device_grammars
                    if dg is None or not dg.add(ch.request):
                        self.constraints.add(ch.request.request_id, params, grammar, bad_words)
            for ch in children:
                self.scheduler.add_request(ch.request)
                added.append(ch.request)
        except Exception:
            for req in added:
                self.scheduler.finish_request(req.request_id, RequestStatus.FINISHED_ABORTED)
            for ch in children:
                self._forget_masks(ch.request.request_id)
            raise
        self._parents[request_id] = _Parent(request_id, text, ids, params, children, arrival,
                                            prompt_logprobs=prompt_lps)
        for ch in children:
            self._child_to_parent[ch.request.request_id] = request_id
        return request_id

    def _prompt_scorer(self) -> PromptScorer:
        if self._scorer is None:
            r = self.runner
            self._scorer = PromptScorer(self.config.model, r.params, r.mesh, self.config.kv_dtype,
                                        self.config.cache.page_size,
                                        self._decode_one if self.tokenizer is not None else None)
        return self._scorer

    def _make_detok(self, ids: list[int], params: SamplingParams) -> IncrementalDetokenizer | None:
        if self.tokenizer is None:
            return None
        return IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens)

    @staticmethod
    def _make_stops(params: SamplingParams) -> StopStringMatcher | None:
        if not params.stop:
            return None
        return StopStringMatcher(params.stop, params.include_stop_str_in_output)

    def abort_request(self, request_id: str) -> None:
        parent = self._parents.get(request_id)
        if parent is None:
            return
        for ch in parent.children:
            self.scheduler.finish_request(ch.request.request_id, RequestStatus.FINISHED_ABORTED)
        self._aborted[request_id] = None

    # ------------------------------------------------------------------ cache
    def kv_cache_stats(self) -> dict[str, int]:
        """KV cache counters (monotonic) and gauges for metrics exporters: prefix cache queries
        and hits in tokens (device / host tier), CoW copies, pages swapped in/out, evictions,
        preemptions, page usage. See ``KVCacheManager.stats``."""
        return self.scheduler.kv_stats()

    def reset_prefix_cache(self) -> int:
        """Drop every cached page no request holds (device and host tier); -> pages dropped."""
        pc = self.scheduler.kv.prefix_cache
        return pc.reset() if pc is not None else 0

    # ------------------------------------------------------------------ loop
    def has_unfinished_requests(self) -> bool:
        return bool(self._parents)

    def step(self) -> list[RequestOutput]:
        """One engine iteration; returns outputs of every parent that changed.

        Overlapped (``async_scheduling``): step N+1 is scheduled and dispatched before the
        results of step N are read, so the device never waits for the host; the outputs
        returned are step N's. Synchronous: dispatch, then read the same step's results.

        Speculative decoding (while ``Scheduler.spec_active``): the drafts (the draft model's,
        or n-gram lookup over each slot's token history) are made in the step and stay on the
        device: the next step verifies them while the host reads this one (chained rows,
        jserve/spec/chain.py), so the loop overlaps as it does without speculation, except
        while host-masked requests run: their masks follow the drafts, so the step in flight
        is read first and drafts come from tokens on the host.
        """
        touched: dict[str, None] = {}
        ahead: Ahead | None = None   # the grammars advancing on the helper thread
        if self._in_flight is not None and len(self.constraints) and self.scheduler.spec_active():
            # Host-masked rows draft from tokens on the host: read the step in flight first.
            self._consume(self._in_flight, touched)
            self._in_flight = None
        elif (self._in_flight is not None and self.grammar.needs_tokens(self._in_flight)
              and self._read_first()):
            # The host is the bottleneck (the device is done, or nearly): read that step now;
            # the helper thread advances the grammars and puts the next masks up while this
            # one plans.
            ahead = self.grammar.ahead(self._in_flight, self._read(self._in_flight, touched))
            self._in_flight = None
        # Else a finished step in flight is read after the next launch, not before: its tokens'
        # copy to the host lands while the host launches (H200, session 15: reading it first
        # waited ~0.14 ms of code-small's 0.88 ms step for that copy, with the device idle).
        sched_out = self.scheduler.schedule()
        if ahead is not None:   # (jserve/grammar_steps.py)
            handle = self.grammar.dispatch_read(sched_out, ahead)
        elif self._in_flight is not None and self.grammar.needs_tokens(self._in_flight):
            # A host-masked row's next mask needs the token it sampled in the step in flight.
            # Split step (jserve/split_step.py): the forward goes first and runs while the host
            # reads that step and fills the masks; else read first, then the fused step.
            handle = None
            split = self.runner.can_split(sched_out)
            pending = self.runner.dispatch_forward(sched_out) if split else None
            t = time.perf_counter()
            if split:   # done before its read: the host, not the device, is the bottleneck
                self.grammar.read_first = self._in_flight_done()
            self._consume(self._in_flight, touched)
            self.grammar.attach(sched_out, after_read=True)
            self.grammar.seconds = time.perf_counter() - t
            self._in_flight = None
            if pending is not None:
                handle = self.runner.dispatch_sample(pending, sched_out.token_masks)
            elif not sched_out.is_empty:
                handle = self.runner.dispatch(sched_out)
        else:
            if len(self.constraints):
                self.grammar.attach(sched_out)
            handle = self.runner.dispatch(sched_out) if not sched_out.is_empty else None
        self._stamp_scheduled(sched_out)
        done, self._in_flight = self._in_flight, handle
        if not self._overlap:
            if done is not None:
                self._consume(done, touched)
            done, self._in_flight = handle, None
        if done is not None:
            self._consume(done, touched)
        return self._outputs(touched)

    def _outputs(self, touched: dict[str, None]) -> list[RequestOutput]:
        """The outputs of a step's touched requests, plus those finished outside the scheduler's
        update (aborts: each reports once); finished requests are released. (Every other finish
        comes from a step's update, whose requests are touched: no scan over all requests, which
        an offline batch of 1,000 queued requests would pay at every step.)"""
        for pid in self._aborted:
            if pid in self._parents:
                touched[pid] = None
        self._aborted.clear()
        outputs = []
        for pid in touched:
            parent = self._parents[pid]
            final_only = parent.params.output_kind is RequestOutputKind.FINAL_ONLY
            if final_only and not parent.params.stop and not all(
                    ch.request.is_finished for ch in parent.children):
                # Nothing to report, and no stop string to look for: text waits for the end.
                if parent.first_token_time is None and any(
                        ch.request.output_token_ids for ch in parent.children):
                    parent.first_token_time = time.monotonic()
                continue
            out = self._process(parent)
            if out.finished:
                self._release(pid)
            if out.finished or not final_only:
                outputs.append(out)
        return outputs

    def _stamp_scheduled(self, sched_out: SchedulerOutput) -> None:
        """Metrics, one pass over the step's rows: its token count, and when each request was
        first scheduled (rows that take a slot: admissions and resumptions; the first is kept)."""
        tokens, now = 0, None
        for c in sched_out.chunks:
            tokens += c.num_tokens
            if c.new is None:
                continue
            parent = self._parents.get(self._child_to_parent.get(c.req_id, ""))
            if parent is not None and parent.scheduled_time is None:
                now = now or time.monotonic()
                parent.scheduled_time = now
        self._last_step_tokens = tokens

    def _consume(self, handle: StepHandle | SpecStepHandle, touched: dict[str, None]) -> None:
        """Commit a finished step's tokens; feed them to the host-mask matchers."""
        self.grammar.end(self.grammar.advance(self._read(handle, touched)))

    def _read(self, handle: StepHandle | SpecStepHandle, touched: dict[str, None]) -> list[Request]:
        """Commit a finished step's tokens -> the requests it updated."""
        reqs = self.scheduler.update(handle.sched_out, handle.result())
        for req in reqs:
            touched[self._child_to_parent[req.request_id]] = None
        dg = self.device_grammars
        if dg is not None and len(dg):   # device automata: walk the host mirror, end the complete
            for rid in dg.advance(reqs):
                self.scheduler.finish_request(rid, RequestStatus.FINISHED_ABORTED if rid in dg.errors
                                              else RequestStatus.FINISHED_STOPPED)
        return reqs

    def _in_flight_done(self) -> bool:
        """Whether the step in flight has finished on the device (the host is the bottleneck)."""
        handle = self._in_flight
        return isinstance(handle, StepHandle) and handle.ready()

    def _read_first(self) -> bool:
        """Whether to read the step in flight (its host-masked rows' tokens) before planning the
        next: it is done; or the loop found it done whenever it read it after the next forward
        (``grammar.read_first``), so wait for it: the grammar work then runs beside the plan
        instead of after the read, on the host's critical path (benchmarks/RESULTS.md,
        session 30). A wait longer than that work (the device, not the host, is the
        bottleneck) turns this off until a step is found done again."""
        if self._in_flight_done():
            return True
        if not (self.grammar.read_first and isinstance(self._in_flight, StepHandle)):
            return False
        t = time.perf_counter()
        self._in_flight.tokens.block_until_ready()
        self.grammar.read_first = time.perf_counter() - t < self.grammar.seconds
        return True

    def _release(self, pid: str) -> None:
        parent = self._parents.pop(pid)
        for ch in parent.children:
            self._child_to_parent.pop(ch.request.request_id, None)
            self._forget_masks(ch.request.request_id)

    def _forget_masks(self, rid: str) -> None:
        """Drop a request's host-mask state or device automaton (it is done or was refused)."""
        self.constraints.remove(rid)
        if self.device_grammars is not None:
            self.device_grammars.remove(rid)

    def _process(self, parent: _Parent) -> RequestOutput:
        now = time.monotonic()
        for ch in parent.children:
            self._advance_child(ch)
        if parent.first_token_time is None and any(ch.num_seen for ch in parent.children):
            parent.first_token_time = now
        finished = all(ch.request.is_finished for ch in parent.children)
        outs = [self._completion(i, ch, parent.params) for i, ch in enumerate(parent.children)]
        metrics = {"arrival_time": parent.arrival_time}
        if parent.scheduled_time is not None:
            metrics["scheduled_time"] = parent.scheduled_time
        if parent.first_token_time is not None:
            metrics["first_token_time"] = parent.first_token_time
        if self.config.speculative is not None:   # (plain loops: every output of a step pays this)
            drafts = accepted = 0
            for ch in parent.children:
                drafts += ch.request.spec_num_draft_tokens
                accepted += ch.request.spec_num_accepted_tokens
            metrics["spec_num_draft_tokens"] = drafts
            metrics["spec_num_accepted_tokens"] = accepted
            if drafts:
                metrics["spec_acceptance_rate"] = accepted / drafts
        return RequestOutput(parent.request_id, parent.prompt, parent.prompt_token_ids, outs,
                             finished=finished, metrics=metrics,
                             num_cached_tokens=parent.children[0].request.num_cached_tokens or 0,
                             prompt_logprobs=parent.prompt_logprobs)

    def _advance_child(self, ch: _Child) -> None:
        req = ch.request
        new_ids = req.output_token_ids[ch.num_seen:]
        if ch.stops is not None and ch.detok is not None and len(new_ids) > 1:
            # Several tokens at once (a speculative step): look for the stop string token by
            # token, and drop the tokens after the one that completes it (as the one-token
            # steps would never have produced them).
            finished = req.is_finished
            for j in range(len(new_ids)):
                last = j == len(new_ids) - 1
                if self._advance_tokens(ch, new_ids[j:j + 1], finished and last) and not last:
                    del req.output_token_ids[ch.num_seen:]
                    del req.output_logprobs[ch.num_seen:]
                    req.status = RequestStatus.FINISHED_STOPPED
                    req.stop_reason = ch.stops.feed("")[1]
                    break
            return
        self._advance_tokens(ch, new_ids, req.is_finished)

    def _advance_tokens(self, ch: _Child, new_ids: list[int], final: bool) -> bool:
        """Logprobs, text and stop strings of ``new_ids``; ``final``: the sequence ends with
        them. -> whether a stop string matched."""
        req = ch.request
        if req.sampling_params.logprobs is not None:
            entries = req.output_logprobs[ch.num_seen:ch.num_seen + len(new_ids)]
            for tid, entry in zip(new_ids, entries, strict=True):
                ch.logprobs.append(self._logprob_dict(tid, entry))
                ch.cumulative_logprob += entry[0]
        ch.num_seen += len(new_ids)
        if ch.detok is None:
            return False
        if final and ch.stops is None and len(new_ids) > 1:   # FINAL_ONLY's end: one decode
            delta = ch.detok.finish(new_ids)
        else:
            delta = ch.detok.add(new_ids) if new_ids else ""
            if final:
                delta += ch.detok.flush()
        if ch.stops is None:
            ch.text += delta
            return False
        emit, hit = ch.stops.feed(delta, final=final)
        ch.text += emit
        if hit is not None and not req.is_finished:
            self.scheduler.finish_request(req.request_id, RequestStatus.FINISHED_STOPPED,
                                          stop_reason=hit)
        return hit is not None

    def _logprob_dict(self, sampled: int, entry: tuple[float, list[tuple[int, float]]]
                      ) -> dict[int, Logprob]:
        """The sampled token first (its rank if it is among the top-N), then the top-N."""
        sampled_lp, top = entry
        ranks = {int(tid): rank for rank, (tid, _) in enumerate(top, start=1)}
        d = {int(sampled): Logprob(float(sampled_lp), ranks.get(int(sampled)),
                                   self._decode_one(sampled))}
        for tid, lp in top:
            d.setdefault(int(tid), Logprob(float(lp), ranks[int(tid)], self._decode_one(tid)))
        return d

    def _decode_one(self, tid: int) -> str | None:
        return self.tokenizer.decode([int(tid)], skip_special_tokens=False) if self.tokenizer else None

    @staticmethod
    def _completion(index: int, ch: _Child, params: SamplingParams) -> CompletionOutput:
        req = ch.request
        return CompletionOutput(
            index=index, text=ch.text, token_ids=req.output_token_ids[:ch.num_seen],
            cumulative_logprob=ch.cumulative_logprob if params.logprobs is not None else None,
            logprobs=list(ch.logprobs) if params.logprobs is not None else None,
            finish_reason=req.finish_reason, stop_reason=req.stop_reason)

    # --- narrow API for front-ends -------------------------------------------------------
    # AsyncEngine and server/ read the engine only through these (plus add_request,
    # abort_request, step): immutable facts and snapshots, never the scheduler / pool / runner.
    @property
    def max_model_len(self) -> int:
        """The longest sequence (prompt + output) served: the configured value, capped at what
        the KV pool holds."""
        return self._startup.max_model_len

    @property
    def startup(self) -> StartupInfo:
        """Start-up facts, fixed at construction (pool plan, limits, start-up / compile time)."""
        return self._startup

    def stats(self) -> EngineStats:
        """A snapshot of the queues and the KV cache; cheap enough to call every step."""
        kv = self.kv_cache_stats()
        return EngineStats(num_running=self.scheduler.num_running,
                           num_waiting=self.scheduler.num_waiting,
                           kv_pages_used=kv["pages_used"], kv_pages_free=kv["pages_free"],
                           kv_pages_total=kv["pages_total"],
                           num_preemptions_total=self.scheduler.num_preemptions_total,
                           kv_cache=kv, step_tokens=self._last_step_tokens)
