"""Which compiled step program runs a plan: its token bucket and its step variant.

Where it sits: start-up compiles ``StepVariants.all()`` (``Runner.compile``); ``Runner.pack``
asks ``bucket`` for a plan's token bucket and ``Runner.dispatch`` asks ``choose`` for its
variant. The speculative verify variants pick theirs with ``decode_buckets`` and
``greedy_rows`` the same way (jserve/spec/verify_step.py)::

    token bucket   a decode bucket (a pure decode step       a larger bucket (always carries
                   of at most max_num_seqs rows lands in it)  prefill work)
    variants       greedy; plain sampler; greedy decode-only  general sampler;
                   (the smallest); general (the largest)      flash prefill (large enough)

- Greedy (argmax, no penalty state, no conditional): steps whose sampling rows are all greedy
  without logprobs or penalties. Only in decode buckets: a larger bucket's prefill work dwarfs
  the host's wait at the general sampler's conditionals, and a second compile there would only
  slow start-up. The decode-only greedy variant (attention's decode launch alone) exists for
  the smallest bucket, where small-batch decode is launch-bound.
- Plain sampler (no conditional, no filters; ``step_program``): decode buckets' other steps.
  A batch with top-k / top-p / min-p rows moves up to the next bucket with the general
  sampler; the largest bucket always has it.
- General sampler: every other bucket, and flash-prefill steps (all chunks start at token 0).
- Burst (``num_scheduler_steps`` N > 1): the smallest bucket's decode-only variant (greedy, and
  with the plain sampler) run N times in one program, for plans the scheduler made a burst
  (``SchedulerOutput.burst``). At pipeline parallelism the plain sampler's only, also in the
  bucket of ``max_num_seqs`` rows, which bursts of more rows than the smallest bucket's pad up
  to (``bucket(..., burst)``; jserve/burst_step.py runs the rows in groups across the stages).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from jserve.config import SchedulerConfig
from jserve.runner_state import RequestRows, uses_filters
from jserve.sampling_params import SamplingParams
from jserve.scheduler_output import SchedulerOutput
from jserve.step_program import StepVariant


def decode_buckets(buckets: tuple[int, ...], widest: int) -> frozenset[int]:
    """The buckets a pure decode step of at most ``widest`` tokens lands in: the smallest, and
    each whose next smaller bucket is below ``widest``."""
    return frozenset(t for i, t in enumerate(buckets) if i == 0 or buckets[i - 1] < widest)


def greedy_rows(params: Iterable[SamplingParams]) -> bool:
    """Whether sampling rows with these parameters can run a greedy variant (argmax; no
    logprobs, no penalties)."""
    return all(p.greedy and p.logprobs is None and not p.uses_penalties for p in params)


def sampling_filters(out: SchedulerOutput, rows: RequestRows) -> bool:
    """Whether a sampling row of the plan uses top-k, top-p or min-p (the plain sampler has
    none of them), before or after ``rows`` applied the plan (``Runner.pack`` reads
    ``rows.filtered`` of the applied slots instead: one gather, no loop)."""
    for c in out.chunks:
        if c.samples:
            if c.new is not None:
                if uses_filters(c.new.params):
                    return True
            else:
                slot = rows.slot_of(c.req_id)   # None: ``Runner.pack`` raises
                if slot is not None and rows.filtered[slot]:
                    return True
    return False


class StepVariants:
    """The step variants of one scheduler configuration (module docstring)."""

    def __init__(self, sched: SchedulerConfig, pipelined_bursts: bool = False) -> None:
        """``pipelined_bursts``: ``EngineConfig.pipelined_bursts``."""
        self._sched = sched
        self._pipelined = pipelined_bursts
        # Buckets with burst programs: the smallest; at pp also the one of max_num_seqs rows
        # (bursts of more rows pad up to it: decode is weight-bound, one compile instead of one
        # per decode bucket of an unrolled (N + 1) * S-tick program), the plain sampler's only.
        self.burst_buckets = sorted({sched.token_buckets[0]} | (
            {self.smallest_of(sched.token_buckets, sched.max_num_seqs)} if pipelined_bursts else set()))
        self.buckets = sched.token_buckets
        self.decode = decode_buckets(self.buckets, sched.max_num_seqs)

    def has_general(self, token_bucket: int) -> bool:
        return token_bucket not in self.decode or token_bucket == self.buckets[-1]

    def all(self) -> list[StepVariant]:
        """Every variant start-up compiles."""
        out = []
        for t in self.buckets:
            if self.has_general(t):
                out.append(StepVariant(t, False, False))
            if t in self.decode:
                out.append(StepVariant(t, False, False, plain=True))
                out.append(StepVariant(t, False, True))
            if t == self.buckets[0]:
                out.append(StepVariant(t, False, True, decode_only=True))
            if t in self.burst_buckets and self._sched.num_scheduler_steps > 1:
                out += [self.burst(self._sched.num_scheduler_steps, g, t) for g in (True, False)
                        if not (g and self._pipelined)]
            if self._sched.flash_prefill(t):
                out.append(StepVariant(t, True, False))
        return out

    def burst(self, steps: int, greedy: bool, tokens: int | None = None) -> StepVariant:
        """The variant running ``steps`` decode steps in one program (a burst bucket's
        decode-only variant, unrolled: jserve/burst_step.py; the smallest by default), greedy
        or with the plain sampler (always at pp: greedy rows draw the argmax in it)."""
        greedy = greedy and not self._pipelined
        return StepVariant(tokens or self.buckets[0], False, greedy, decode_only=True,
                           plain=not greedy, burst=steps)

    @staticmethod
    def smallest_of(buckets: tuple[int, ...], num_tokens: int) -> int:
        """The smallest of ``buckets`` holding ``num_tokens``."""
        for t in buckets:
            if num_tokens <= t:
                return t
        raise ValueError(f"step of {num_tokens} tokens exceeds max_num_batched_tokens "
                         f"({buckets[-1]})")

    def smallest(self, num_tokens: int) -> int:
        """The smallest token bucket holding ``num_tokens``."""
        return self.smallest_of(self.buckets, num_tokens)

    def bucket(self, num_tokens: int, filters: Callable[[], bool], burst: int = 1) -> int:
        """The token bucket of a plan of ``num_tokens`` tokens; ``filters()``: whether some
        sampling row uses top-k / top-p / min-p (asked only where it matters); ``burst`` > 1:
        the plan is a burst, packed in a burst bucket."""
        if burst > 1:
            return self.smallest_of(self.burst_buckets, num_tokens)
        t = self.smallest(num_tokens)
        if not self.has_general(t) and filters():
            t = next(b for b in self.buckets if b > t and self.has_general(b))
        return t

    def choose(self, token_bucket: int, fresh: bool, masked: bool, one_token_rows: bool,
               sampling: list[SamplingParams], filters: Callable[[], bool]) -> StepVariant:
        """The variant of a plan packed in ``token_bucket``. fresh: every chunk starts at token
        0 (flash prefill); masked: some row samples under a token mask or logit bias;
        one_token_rows: every row computes one token; sampling: the sampling rows' params."""
        t = token_bucket
        greedy = not fresh and not masked and t in self.decode and greedy_rows(sampling)
        decode_only = greedy and t == self.buckets[0] and one_token_rows
        plain = (not greedy and not fresh and t in self.decode
                 and not (self.has_general(t) and filters()))
        return StepVariant(t, fresh, greedy, decode_only, plain)
