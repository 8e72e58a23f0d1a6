"""A plain step's host-facing outputs land in donated buffers of fixed address, two slots in turn
(jserve/host_outputs.py); a handle still reading a slot gets host arrays before it is donated."""

import jax
import numpy as np
from engine_helpers import address, assert_twins_in_turn_in_place, recording, run_tokens

from jserve.host_outputs import HostOutputStep
from jserve.sampling_params import SamplingParams
from jserve.step_program import StepVariant


def padding_calls(engine, variant: StepVariant, n: int) -> list[tuple]:
    """``n`` calls of ``variant``'s step on a bucket of padding rows -> each call's (host-facing
    outputs, their addresses)."""
    r = engine.runner
    step, greedy = r._compiled[variant], variant.greedy
    layout = r.layout(variant.tokens)
    ibuf, _, _ = layout.new_buffers()
    joint = jax.device_put(layout.joint(ibuf), r._replicated)
    outs = []
    for _ in range(n):
        pen = None if greedy else r.penalty_state
        r.kv, pen, r.slot_table, r._prev_tokens, *host = step(
            r.params, r.kv, pen, r.slot_table, r._prev_tokens, joint, r.step_masks(greedy))
        if pen is not None:
            r.penalty_state = pen
        host = tuple(a for a in host if a is not None)
        outs.append((host, [address(a) for a in host]))
    return outs


def test_outputs_alternate_two_fixed_buffers_and_owners_get_host_arrays(make_engine):
    engine = make_engine("llama")
    r = engine.runner
    greedy_decode = StepVariant(r.bucket_for(1)[0], False, True, True)
    sampling = min((v for v in r._compiled if not v.greedy and v.burst == 1), key=lambda v: v.tokens)
    for variant in (greedy_decode, sampling):
        step, greedy = r._compiled[variant], variant.greedy
        assert isinstance(step, HostOutputStep) and len(step.executables) == 1   # (no twin on CPU)
        outs = padding_calls(engine, variant, 2)
        assert len(outs[0][0]) == (1 if greedy else 4)
        step.own(owner := OwnerProbe(outs[1][0][0]))   # a handle reading the last call's tokens
        values = np.asarray(outs[1][0][0]).copy()
        later = padding_calls(engine, variant, 4)
        for i, (_, where) in enumerate(later):   # call i writes where call i - 2 wrote, in place
            prior, prior_where = (outs + later)[len(outs) + i - 2]
            assert where == prior_where, (greedy, i)
            assert all(a.is_deleted() for a in prior)   # donated
        assert later[0][1][0] != later[1][1][0]   # two slots
        assert isinstance(owner.tokens, np.ndarray) and owner.fetched == 1
        np.testing.assert_array_equal(owner.tokens, values)


class OwnerProbe:
    """The part of ``StepHandle`` a slot's owner needs: ``fetch`` its arrays to the host."""

    def __init__(self, tokens: jax.Array) -> None:
        self.tokens, self.fetched = tokens, 0

    def fetch(self) -> None:
        self.tokens, self.fetched = np.array(self.tokens), self.fetched + 1   # (a copy: see StepHandle)


def test_twin_executables_take_the_calls_in_turn_with_the_same_tokens(make_engine):
    """Two executables (here the one executable twice) each take every other call, slot i's
    buffers always going to executable i; the loop's tokens are those of one."""
    engine = make_engine("llama")
    r = engine.runner
    prompts = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14]]
    sp = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    want = run_tokens(engine, prompts, sp)
    variant = StepVariant(r.bucket_for(1)[0], False, True, True)
    exe = r._compiled[variant].executables[0]
    seen: list[tuple[int, int, int]] = []
    r._compiled[variant] = HostOutputStep(recording((exe, exe), seen), lambda: r.host_buffers(variant))
    assert run_tokens(engine, prompts, sp) == want
    assert_twins_in_turn_in_place(seen)
