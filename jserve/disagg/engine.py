"""DisaggEngine: an ``LLMEngine`` whose loop drives a prefill group and a decode group.

Where it sits: what ``build_engine`` returns for ``prefill_devices`` / ``decode_devices``
(jserve/disagg/builder.py); ``LLM``, ``AsyncEngine`` and the servers use it as any engine.
Request bookkeeping (validation, ``n`` > 1 children, detokenizing, stop strings, grammars,
outputs, stats) is ``LLMEngine``'s, over the ``TwoGroupScheduler`` facade; only ``step`` differs::

    step():
      release_ready     prefill pages of transfers whose bytes reached the decode group
      prefill group     read its oldest step if finished; plan + dispatch its next step, then
                        gather the pages of the prompts it completes (handoff.prefetch)
      handoff.move      prefilled requests (first token on the host, already streamed)
                        -> decode group, their KV pages copied device to device
      decode group      read its oldest step if finished; plan + dispatch its next step
      nothing moved?    block until the oldest step of the decode group (else the prefill
                        group, else a transfer) finishes, and go round again
      -> the outputs of every request that changed (as LLMEngine.step)

Each group keeps up to two steps dispatched and reads one only once it has finished, so the
groups run at their own pace: a long prefill chunk never delays a decode step. With
``async_scheduling=False`` each group reads every step right after dispatching it (the
synchronous reference). One host thread does all of it: the two schedulers never run
concurrently with the handoff or with ``add_request`` / ``abort_request``.
"""

from __future__ import annotations

from jserve.config import EngineConfig
from jserve.disagg.group import Group
from jserve.disagg.handoff import Handoff
from jserve.disagg.two_groups import TwoGroupScheduler
from jserve.engine import LLMEngine
from jserve.engine_api import BuildInfo
from jserve.outputs import RequestOutput
from jserve.tokenizer import Tokenizer


class DisaggEngine(LLMEngine):
    """Prefill on one device group, decode on another (see the module docstring)."""

    def __init__(self, config: EngineConfig, prefill: Group, decode: Group, handoff: Handoff,
                 tokenizer: Tokenizer | None, build: BuildInfo) -> None:
        self.groups = TwoGroupScheduler(prefill, decode, handoff)
        self.prefill, self.decode, self.handoff = prefill, decode, handoff
        # The prefill runner also serves prompt_logprobs (PromptScorer reads runner.params/mesh).
        super().__init__(config, prefill.runner, tokenizer, build.pool_plan.num_pages, build,
                         scheduler=self.groups)

    def has_unfinished_requests(self) -> bool:
        return bool(self._parents) or bool(self.handoff.in_flight)

    def step(self) -> list[RequestOutput]:
        """One round over both groups (see the module docstring); -> changed requests' outputs."""
        touched: dict[str, None] = {}
        while not self._advance(touched) and not touched and self._wait():
            pass
        return self._outputs(touched)

    def _advance(self, touched: dict[str, None]) -> bool:
        moved = self.handoff.release_ready()
        moved |= self._advance_group(self.prefill, touched)
        moved |= self.handoff.move()
        moved |= self._advance_group(self.decode, touched)
        return moved

    def _advance_group(self, g: Group, touched: dict[str, None]) -> bool:
        """Read ``g``'s finished steps, then plan and dispatch its next one if it has room."""
        moved = False
        while g.oldest_ready():
            self._consume(g.pending.popleft(), touched)
            moved = True
        if any(self.grammar.needs_tokens(h) for h in g.pending):
            return moved   # a host-masked row's token must land before the next plan
        if not g.can_plan():
            return moved
        out = self.groups.plan(g)
        if out.is_empty:
            self.groups.forget(out)
            return moved
        if len(self.constraints):
            self.grammar.attach(out)
        handle = g.runner.dispatch(out)
        self._stamp_scheduled(out)
        g.last_step_tokens = out.num_tokens
        self._last_step_tokens = self.prefill.last_step_tokens + self.decode.last_step_tokens
        if handle is None:
            self.groups.forget(out)
            return moved
        g.pending.append(handle)
        if g is self.prefill:   # completed prompts' pages: gathered right behind this step
            self.handoff.prefetch(out)
        if not self._overlap:   # async_scheduling=False: each step read right after dispatch
            self._consume(g.pending.popleft(), touched)
        return True

    def _wait(self) -> bool:
        """Block until something can move: the decode group's oldest step (its steps are short,
        and the prefill group's next step is already queued on its device), else the prefill
        group's, else a transfer. -> False when nothing is in flight."""
        for g in (self.decode, self.prefill):
            arr = g.oldest_output()
            if arr is not None:
                arr.block_until_ready()
                return True
        arr = self.handoff.wait_array()
        if arr is not None:
            arr.block_until_ready()
            return True
        return False
