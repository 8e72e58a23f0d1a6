"""Data parallelism: dp=2 replicas on the two forced host devices give dp=1's greedy tokens on
the three fixtures; the router keeps shared prefixes together and spreads load."""

import jax
import numpy as np
import pytest
from engine_helpers import run_engine
from fixture_paths import ARCHS

from jserve.data_parallel import DataParallelEngine, PrefixRouter
from jserve.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
SMALL = dict(max_num_seqs=4, max_num_batched_tokens=16, num_pages=40)
needs_2 = pytest.mark.skipif(len(jax.devices()) < 2, reason="needs 2 devices (XLA_FLAGS host count)")


def test_router_prefers_the_replica_holding_the_prefix():
    r = PrefixRouter(2, slack=2)
    system = "You are a helpful assistant. " * 10          # > 128 characters
    assert r.route(system + "question one", [0, 0]) == 0
    assert r.route(system + "another question", [1, 0]) == 0        # affinity beats a small load gap
    assert r.route(system + "fourth", [2, 0]) == 0                  # within slack
    assert r.route(system + "fifth", [3, 0]) == 1                   # past slack: least loaded
    assert r.route(system + "sixth", [0, 0]) == 1                   # the prefix now lives on 1


def test_router_spreads_unrelated_prompts_by_load():
    r = PrefixRouter(3, slack=1)
    assert [r.route(f"prompt {i}", [0, 0, 0]) for i in range(3)] == [0, 1, 2]   # ties round-robin
    assert r.route("something new", [2, 0, 1]) == 1
    assert r.route([1, 2, 3], [5, 5, 4]) == 2


def test_router_salts_and_token_prompts():
    r = PrefixRouter(2, slack=10)
    ids = list(range(100, 300))
    a = r.route(ids, [0, 0])
    assert r.route(ids[:150] + [7, 7], [0, 0]) == a                  # shares 128 tokens
    assert r.route(ids, [0, 0], salt="tenant-b") != a                # other salt: no affinity, tie moves on
    with pytest.raises(ValueError, match="loads"):
        r.route("x", [0])


@needs_2
@pytest.mark.parametrize("arch", ARCHS)
def test_dp2_matches_dp1(make_engine, arch):
    rng = np.random.default_rng(7)
    prompts = [rng.integers(5, 500, n).tolist() for n in (3, 9, 17, 25, 31, 6)]
    items = [(p, GREEDY) for p in prompts]
    ref = [o.outputs[0].token_ids for o in run_engine(make_engine(arch, **SMALL), items)]
    engine = make_engine(arch, data_parallel_size=2, **SMALL)
    assert isinstance(engine, DataParallelEngine) and len(engine.replicas) == 2
    devices = [set(r.runner.mesh.devices.flat) for r in engine.replicas]
    assert not devices[0] & devices[1]
    ids = [engine.add_request(None, p, GREEDY) for p in prompts]
    owners = {engine.replica_of(i) for i in ids}
    assert owners == {0, 1}                                          # both replicas got work
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    assert [done[i] for i in ids] == ref
    st = engine.stats()
    assert st.kv_pages_total == sum(r.stats().kv_pages_total for r in engine.replicas)
    assert engine.startup.kv_pages_total == st.kv_pages_total


@needs_2
def test_dp_needs_enough_devices(make_engine):
    with pytest.raises(ValueError, match="data_parallel_size=3 x tensor_parallel_size=1 needs 3 devices"):
        make_engine("llama", data_parallel_size=3, **SMALL)


@needs_2
def test_dp_engine_behind_the_async_engine(make_engine):
    """The front-ends' path: AsyncEngine over dp=2 replicas, a grammar compiled off the engine
    thread on every replica (``compile_grammar``) and a priority passed through."""
    import asyncio
    import re

    from jserve.async_engine import AsyncEngine

    engine = make_engine("llama", data_parallel_size=2, **SMALL)
    sp = SamplingParams(temperature=0.0, max_tokens=12, structured_outputs={"regex": "[ab]{2,6}"})

    async def main():
        aeng = AsyncEngine(engine)
        try:
            aeng.compile_grammar(sp)
            outs = []
            for i in range(4):
                stream = await aeng.add_request([5 + i, 6, 7], sp, priority=i % 2)
                async with stream:
                    async for out in stream:
                        last = out
                outs.append(last)
            return outs
        finally:
            await aeng.shutdown(timeout_s=5.0)

    outs = asyncio.run(main())
    assert all(re.fullmatch("[ab]{2,6}", o.outputs[0].text) for o in outs)
    assert all(len(r.device_grammars) == 0 and r.automaton_compiler().peek(sp.structured_outputs.key)[0]
               for r in engine.replicas)
