"""Prefill/decode disaggregation (jserve/disagg/): prefill on forced host device 0, decode on
device 1, give colocated serving's tokens (greedy, seeded sampling with n > 1, prefix-cache hits,
stop strings, aborts in flight, swap preemption on the decode side), leak no page on either side
and compile nothing while serving. Engines are shared per module (each build compiles a whole
engine twice: one per group)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from engine_helpers import CompileCounter, run_engine
from fixture_paths import GOLDEN
from jax.sharding import NamedSharding, PartitionSpec

from jserve.builder import default_model_path
from jserve.cli import build_parser, engine_args_from
from jserve.disagg import DisaggEngine
from jserve.disagg.builder import check_fits, check_groups, check_supported
from jserve.disagg.transfer import KVHandoffMover, handoff_buckets
from jserve.options import EngineArgs
from jserve.sampling_params import SamplingParams
from sharding import make_mesh

needs_2 = pytest.mark.skipif(len(jax.devices()) < 2, reason="needs 2 devices (XLA_FLAGS host count)")
GROUPS = dict(prefill_devices=(0,), decode_devices=(1,))
SMALL = dict(max_num_seqs=4, max_num_batched_tokens=16, num_pages=40)   # as test_data_parallel
# llama scenario: a small pool, so long generations preempt (swap) on the decode group
SCENARIO = dict(max_num_seqs=4, max_num_batched_tokens=32, num_pages=24)
GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


def _prompts(seed: int, lengths) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(5, 500, n).tolist() for n in lengths]


def _tokens(outs) -> list[list[list[int]]]:
    return [[c.token_ids for c in o.outputs] for o in outs]


def _assert_drained(engine: DisaggEngine) -> None:
    """Nothing held: every page of both pools free (cached pages count as free), no transfer
    holding prefill pages, refcounts consistent."""
    assert not engine.has_unfinished_requests()
    assert engine.step() == []   # reads a step still in flight for finished requests, if any
    engine.groups.check_invariants()
    for g in (engine.prefill, engine.decode):
        assert g.scheduler.pool.num_used == 0, g.name
        assert not g.pending, g.name
    assert not engine.handoff.in_flight and not engine.handoff.prefetched
    s = engine.stats().kv_cache
    assert s["disagg_prefill_pages_used"] == 0 and s["disagg_decode_pages_used"] == 0


# ---------------------------------------------------------------- start-up checks (no engine)
def test_groups_are_checked():
    assert check_groups([0], [1], 2) == ((0,), (1,))
    for p, d, match in [([0], None, "decode_devices: disaggregation needs both"),
                        (None, [1], "prefill_devices: disaggregation needs both"),
                        ([], [1], "prefill_devices: the group is empty"),
                        ([0, 0], [1], "prefill_devices: device indices repeat"),
                        ([0], [2], "decode_devices: device index 2 does not exist: 2 cpu"),
                        ([0, 1], [1], r"overlap on device\(s\) \[1\]")]:
        with pytest.raises(ValueError, match=match):
            check_groups(p, d, 2, "cpu")
    base = dict(model="x", **GROUPS)
    for extra, match in [(dict(data_parallel_size=2), "data_parallel_size > 1"),
                         (dict(speculative_config={"method": "ngram", "num_speculative_tokens": 2}),
                          "speculative_config"),
                         (dict(pipeline_parallel_size=2), "pipeline_parallel_size > 1"),
                         (dict(tensor_parallel_size=2), "tensor_parallel_size=2")]:
        with pytest.raises(ValueError, match=match):
            check_supported(EngineArgs(**base, **extra))


class _Device:
    """A device that reports a memory limit (what a GPU's ``memory_stats`` gives)."""

    def __init__(self, gib: float) -> None:
        self.limit = int(gib * 2**30)

    def memory_stats(self) -> dict:
        return {"bytes_limit": self.limit}


def test_model_must_fit_each_group_and_serve_the_same_kv_heads():
    big = EngineArgs(model="llama3.1-8b", random_weights=True, **GROUPS)
    check_fits(big, {"prefill": (0,), "decode": (1,)}, [_Device(80), _Device(80)])
    with pytest.raises(ValueError, match=r"^decode_devices: the model's weights take 1[45]\.\d GiB per "
                                         r"device on 1 device\(s\)"):
        check_fits(big, {"prefill": (0,), "decode": (1,)}, [_Device(80), _Device(8)])
    small = EngineArgs(model=str(default_model_path()), prefill_devices=(0,), decode_devices=(1, 2, 3, 4))
    with pytest.raises(ValueError, match="serve 2 and 4 kv heads"):
        check_fits(small, {"prefill": (0,), "decode": (1, 2, 3, 4)}, [_Device(80)] * 5)


def test_options_and_flags():
    with pytest.raises(ValueError, match=r"^prefill_devices must be a non-empty list of distinct"):
        EngineArgs(prefill_devices=[0, 0])
    with pytest.raises(ValueError, match=r"^decode_devices must be"):
        EngineArgs(decode_devices=[])
    assert EngineArgs(prefill_devices=[0, 1]).prefill_devices == (0, 1)
    ns = build_parser().parse_args(["generate", "--prefill-devices", "0,1", "--decode-devices", "2"])
    args = engine_args_from(ns)
    assert (args.prefill_devices, args.decode_devices) == ((0, 1), (2,))
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--prefill-devices", "a"])


@needs_2
def test_bad_groups_fail_before_loading():
    from jserve.llm import LLM

    with pytest.raises(ValueError, match="overlap"):
        LLM(model=str(GOLDEN / "llama"), prefill_devices=[0], decode_devices=[0, 1])
    with pytest.raises(ValueError, match="device index 5 does not exist"):
        LLM(model=str(GOLDEN / "llama"), prefill_devices=[5], decode_devices=[0])


# ---------------------------------------------------------------- the page mover alone
def _pool(device: jax.Device, num_pages: int, quantized: bool, seed: int) -> list[tuple]:
    rng = np.random.default_rng(seed)
    whole = NamedSharding(make_mesh(1, [device]), PartitionSpec())   # a one-device mesh
    shape = (num_pages, 4, 2, 8)   # [pages, page_size, Hkv, d]
    layers = []
    for _ in range(3):
        if quantized:
            data = [rng.integers(-127, 127, shape).astype(np.int8) for _ in range(2)]
            arrs = (*data, *[rng.random((num_pages, 2)).astype(np.float32) for _ in range(2)])
        else:
            arrs = (rng.random(shape).astype(np.float32), rng.random(shape).astype(np.float32))
        layers.append(tuple(jax.device_put(jnp.asarray(a), whole) for a in arrs))
    return layers


@needs_2
@pytest.mark.parametrize("quantized", [False, True], ids=["float", "int8+scales"])
def test_mover_copies_pages_and_scales_across_devices(quantized):
    d0, d1 = jax.devices()[:2]
    src, dst = _pool(d0, 20, quantized, 1), _pool(d1, 16, quantized, 2)
    mover = KVHandoffMover(src, dst, max_pages=12)
    assert mover.buckets == handoff_buckets(12) == (1, 2, 4, 8, 16)
    assert mover.pieces(13) == [(0, 8), (8, 12), (12, 13)]
    dst = mover.warmup(src, dst)   # writes the null page only
    before = [[np.asarray(a) for a in layer] for layer in dst]
    src_ids = [3, 7, 1, 19, 4, 11, 12, 5, 6, 2, 9, 10, 15]
    dst_ids = [2, 5, 9, 1, 14, 3, 4, 6, 7, 8, 10, 11, 13]
    dst, received = mover.send(src, src_ids, dst, dst_ids)
    assert all(b.devices() == {d1} for b in received)
    for layer_s, layer_d, old in zip(src, dst, before, strict=True):
        assert len(layer_d) == (4 if quantized else 2)
        for a_s, a_d, a_old in zip(layer_s, layer_d, old, strict=True):
            got, want = np.asarray(a_d), a_old.copy()
            want[dst_ids] = np.asarray(a_s)[src_ids]
            np.testing.assert_array_equal(got, want)   # moved exactly; other pages untouched
    with pytest.raises(ValueError, match="differ in layout"):
        KVHandoffMover(src, _pool(d1, 16, not quantized, 3), 4)


# ---------------------------------------------------------------- greedy parity, qwen2 / mistral (int8 KV)
@needs_2
@pytest.mark.parametrize("arch, kv", [("qwen2", "auto"), ("mistral", "int8")])
def test_greedy_tokens_equal_colocated(make_engine, arch, kv):
    """int8 KV: each page moves with its scales."""
    items = [(p, GREEDY) for p in _prompts(7, (3, 9, 17, 25, 31, 6, 40, 58))]
    ref = _tokens(run_engine(make_engine(arch, **SMALL, kv_cache_dtype=kv), items))
    engine = make_engine(arch, **SMALL, kv_cache_dtype=kv, **GROUPS)
    assert isinstance(engine, DisaggEngine)
    assert {d.id for d in engine.prefill.runner.mesh.devices.flat} == {0}
    assert {d.id for d in engine.decode.runner.mesh.devices.flat} == {1}
    assert _tokens(run_engine(engine, items)) == ref
    s = engine.stats().kv_cache
    assert s["disagg_handoffs"] == len(items) and s["disagg_transfer_bytes"] > 0
    # The decode group had room: pages were gathered right behind the step sampling token 1.
    assert 0 < s["disagg_prefetched_handoffs"] <= len(items)
    _assert_drained(engine)


# ---------------------------------------------------------------- llama: the full scenario
@pytest.fixture(scope="module")
def llama_pair(make_engine):
    if len(jax.devices()) < 2:
        pytest.skip("needs 2 devices (XLA_FLAGS host count)")
    # (the colocated engine on the host path too: a disaggregated one keeps every grammar there)
    return (make_engine("llama", **SCENARIO, grammar_device_states=0),
            make_engine("llama", **SCENARIO, **GROUPS))


def test_llama_prefix_hits_n_stops_and_swap_equal_colocated(llama_pair):
    """Also grammars (host masks), logit bias, penalties and logprobs across the handoff."""
    ref, dis = llama_pair
    shared = _prompts(11, (40,))[0]
    wave1 = [(shared + p, GREEDY) for p in _prompts(12, (5, 9, 20))]
    wave2 = [(shared + p, GREEDY) for p in _prompts(13, (7, 3))]              # prefix-cache hits
    sampled = [(p, SamplingParams(temperature=0.9, top_p=0.9, seed=5 + i, n=3, max_tokens=8))
               for i, p in enumerate(_prompts(14, (6, 21)))]
    long = [(p, SamplingParams(temperature=0.0, max_tokens=90, ignore_eos=True))
            for p in _prompts(15, (20, 25, 30, 18))]                          # decode pool too small
    # a stop string from the reference's own text: both must cut there
    text_prompt = ref.tokenizer.decode(_prompts(16, (12,))[0])
    probe = run_engine(ref, [(text_prompt, SamplingParams(temperature=0.0, max_tokens=12))])[0]
    stop = probe.outputs[0].text[4:9]
    stopped = [(text_prompt, SamplingParams(temperature=0.0, max_tokens=12, stop=[stop])),
               (text_prompt, SamplingParams(temperature=0.0, max_tokens=12, stop=[stop],
                                            include_stop_str_in_output=True))]
    masked = [(text_prompt, SamplingParams(temperature=0.0, max_tokens=20,
                                           structured_outputs={"regex": "[a-z]{3,8}( [0-9]+)?"})),
              (text_prompt, SamplingParams(temperature=0.0, max_tokens=12, logit_bias={7: 5.0},
                                           repetition_penalty=1.3, logprobs=2))]
    batches = [wave1, wave2, sampled, long, stopped, masked]
    want = [run_engine(ref, b) for b in batches]
    with CompileCounter() as counter:
        got = [run_engine(dis, b) for b in batches]
    assert counter.count == 0, f"{counter.count} compilations while serving"
    for w, g in zip(want, got, strict=True):
        assert _tokens(g) == _tokens(w)
        assert [[c.text for c in o.outputs] for o in g] == [[c.text for c in o.outputs] for o in w]
        assert [[c.finish_reason for c in o.outputs] for o in g] == \
            [[c.finish_reason for c in o.outputs] for o in w]
    assert got[1][0].num_cached_tokens > 0                                    # wave 2 hit the cache
    assert got[4][0].outputs[0].finish_reason == "stop" and stop not in got[4][0].outputs[0].text
    dis._overlap = False                      # async_scheduling=False: each step read at once
    try:
        assert _tokens(run_engine(dis, wave1 + sampled)) == _tokens(want[0] + want[2])
    finally:
        dis._overlap = True
    s = dis.stats().kv_cache
    assert s["prefix_cache_hits_device"] > 0
    assert dis.decode.scheduler.kv_stats()["preemptions_swap"] > 0           # swap on the decode side
    _assert_drained(dis)


def test_llama_aborts_anywhere_leak_nothing(llama_pair):
    """Random requests, aborted at random moments (waiting, prefilling, prefilled, in transit,
    decoding); the rest equal colocated serving; both pools drain."""
    ref, dis = llama_pair
    rng = np.random.default_rng(3)
    items = []
    for i in range(1000):   # the issue: 1,000 random requests with aborts
        p = rng.integers(5, 500, int(rng.integers(2, 60))).tolist()
        n = int(rng.integers(1, 3))
        sp = SamplingParams(temperature=0.0 if n == 1 else 0.8, seed=i, n=n,
                            max_tokens=int(rng.integers(1, 24)), ignore_eos=True)
        items.append((p, sp))
    ids = [f"r{i}" for i in range(len(items))]
    aborted, done, in_transit_aborts, added = set(), {}, 0, 0
    while added < len(items) or dis.has_unfinished_requests():
        while added < len(items) and dis.stats().num_waiting < 24:   # arrivals while serving
            dis.add_request(ids[added], *items[added])
            added += 1
            if rng.random() < 0.5:
                break
        held = dis.handoff.in_flight[-1].held if dis.handoff.in_flight else {}
        if held and in_transit_aborts < 5:                      # abort right after a handoff
            rid = next(iter(held)).split("#")[0]
            if rid not in done:
                dis.abort_request(rid)
                aborted.add(rid)
                in_transit_aborts += 1
        if rng.random() < 0.08:
            live = [r for r in ids[:added] if r not in done and r not in aborted]
            if live:
                rid = live[int(rng.integers(len(live)))]
                dis.abort_request(rid)
                aborted.add(rid)
        for out in dis.step():
            if out.finished:
                done[out.request_id] = out
    assert in_transit_aborts > 0 and len(aborted) > 10
    _assert_drained(dis)
    keep = [i for i, rid in enumerate(ids) if rid not in aborted]
    want = [t for a in range(0, len(keep), 200)
            for t in _tokens(run_engine(ref, [items[i] for i in keep[a:a + 200]]))]
    assert [_tokens([done[ids[i]]])[0] for i in keep] == want
    for rid in aborted:
        assert all(c.finish_reason in ("abort", "length") for c in done[rid].outputs)


# ---------------------------------------------------------------- the bundled model
@needs_2
def test_bundled_model_text_and_stop_strings_equal_colocated(make_engine):
    bundled = dict(model=str(default_model_path()), max_model_len=96, max_num_seqs=4,
                   max_num_batched_tokens=16, num_pages=40)   # one token bucket: few compiles
    prompts = ["def fibonacci(n):", "class Stack:\n    def __init__(self):", "import os\n"]
    params = [SamplingParams(temperature=0.0, max_tokens=24),
              SamplingParams(temperature=0.0, max_tokens=24, stop=["\n"]),
              SamplingParams(temperature=0.7, seed=3, n=2, max_tokens=16)]
    items = list(zip(prompts, params, strict=True))
    want = run_engine(make_engine(**bundled), items)
    dis = make_engine(**bundled, **GROUPS)
    got = run_engine(dis, items)
    assert _tokens(got) == _tokens(want)
    assert [[c.text for c in o.outputs] for o in got] == [[c.text for c in o.outputs] for o in want]
    _assert_drained(dis)


def test_llama_async_engine_streams_and_exports_group_metrics(llama_pair):
    """The async front-end (what the HTTP and gRPC servers run on) over a disaggregated engine:
    streams equal colocated serving; /metrics carries the per-group gauges and handoff counters."""
    import asyncio

    from jserve.async_engine import AsyncEngine
    from server.metrics import PrometheusStats

    ref, dis = llama_pair
    prompts = _prompts(21, (4, 13, 29))
    want = _tokens(run_engine(ref, [(p, GREEDY) for p in prompts]))
    prom = PrometheusStats.for_engine("m", dis)

    async def one(aeng, p):
        firsts, last = [], None
        async for out in aeng.generate(p, GREEDY):
            firsts.append(len(out.outputs[0].token_ids))
            last = out
        return firsts[0], last

    async def main():
        aeng = AsyncEngine(dis, stats=prom)
        try:
            return await asyncio.gather(*[one(aeng, p) for p in prompts])
        finally:
            await aeng.shutdown(timeout_s=5.0)

    results = asyncio.run(main())
    assert [[r[1].outputs[0].token_ids] for r in results] == want
    text = prom.render().decode()
    assert 'jserve:disagg_handoffs_total{model_name="m"}' in text
    assert 'jserve:disagg_decode_pages_total{model_name="m"} 23.0' in text
    assert 'jserve:disagg_transfer_bytes_total{model_name="m"} 0.0' not in text
    # The prefill group's token is reported alone. Read from the engine's own outputs: a stream
    # delivers the newest cumulative output, so a busy consumer may see its first two together.
    firsts: dict[str, int] = {}
    for i, p in enumerate(prompts):
        dis.add_request(f"first{i}", p, GREEDY)
    while dis.has_unfinished_requests():
        for out in dis.step():
            if out.outputs[0].token_ids:
                firsts.setdefault(out.request_id, len(out.outputs[0].token_ids))
    assert len(firsts) == len(prompts) and set(firsts.values()) == {1}
    _assert_drained(dis)
