"""AsyncEngine: the engine thread, streams, aborts, step failures, draining shutdown."""

import asyncio
import threading
import time

import pytest

from jserve.async_engine import (
    AsyncEngine,
    DeltaTracker,
    EngineDeadError,
    EngineDrainingError,
    RequestFailedError,
)
from jserve.engine_api import EngineHealth
from jserve.metrics import RequestStats, StepStats
from jserve.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
PROMPTS = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16], [17, 18]]


@pytest.fixture(scope="module")
def engine(make_engine):
    return make_engine("llama")


@pytest.fixture(scope="module")
def reference(engine):
    """Token ids from the synchronous engine (before any AsyncEngine owns it)."""
    ids = {}
    for i, p in enumerate(PROMPTS):
        engine.add_request(f"ref{i}", p, GREEDY)
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                ids[out.request_id] = out.outputs[0].token_ids
    return [ids[f"ref{i}"] for i in range(len(PROMPTS))]


class Recorder:
    """A real StatsListener that keeps what it was told."""

    def __init__(self):
        self.steps: list[StepStats] = []
        self.ttfts: list[float] = []
        self.gaps: list[float] = []
        self.tokens = 0
        self.finished: list[RequestStats] = []

    def on_step(self, s):
        self.steps.append(s)

    def on_first_token(self, ttft, prompt_tokens):
        self.ttfts.append(ttft)

    def on_token_gaps(self, gaps, n):
        self.gaps.extend(gaps)
        self.tokens += n

    def on_request_finished(self, s):
        self.finished.append(s)


def run(coro_fn, engine, stats=None, shutdown=True):
    """Run ``coro_fn(async_engine)`` on a fresh event loop with a fresh AsyncEngine."""
    async def main():
        aeng = AsyncEngine(engine, stats=stats)
        try:
            return await coro_fn(aeng)
        finally:
            if shutdown:
                await aeng.shutdown(timeout_s=5.0)
    return asyncio.run(main())


async def _collect(aeng, prompt, params):
    last = None
    async for out in aeng.generate(prompt, params):
        last = out
    return last


async def _pages_used(aeng):
    return await aeng.call(lambda e: (e.stats().kv_pages_used, e.has_unfinished_requests()))


def test_concurrent_generate_matches_sync_engine(engine, reference):
    rec = Recorder()

    async def main(aeng):
        outs = await asyncio.gather(*[_collect(aeng, p, GREEDY) for p in PROMPTS])
        return outs, await _pages_used(aeng)

    outs, (used, busy) = run(main, engine, stats=rec)
    assert [o.outputs[0].token_ids for o in outs] == reference
    assert all(o.finished and o.outputs[0].finish_reason == "length" for o in outs)
    assert (used, busy) == (0, False)
    assert len(rec.finished) == len(PROMPTS) and len(rec.ttfts) == len(PROMPTS)
    assert rec.tokens == 12 * len(PROMPTS)
    assert all(s.generation_tokens == 12 and s.finish_reasons == ("length",) for s in rec.finished)
    assert all(0 < s.ttft_seconds <= s.e2e_seconds for s in rec.finished)
    assert rec.steps and rec.steps[-1].engine.kv_pages_used == 0 and rec.steps[-1].engine.num_running == 0


def test_outputs_are_cumulative_and_deltas_rebuild_them(engine, reference):
    async def main(aeng):
        tracker, toks, text, seen = DeltaTracker(), [], "", []
        async for out in aeng.generate(PROMPTS[0], GREEDY):
            seen.append(len(out.outputs[0].token_ids))
            for d in tracker.update(out):
                toks += d.token_ids
                text += d.text
        return out, toks, text, seen

    final, toks, text, seen = run(main, engine)
    assert toks == final.outputs[0].token_ids == reference[0]
    assert text == final.outputs[0].text
    assert seen == sorted(seen) and seen[-1] == 12


def test_abort_mid_stream_frees_pages_at_once(engine):
    long = SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)

    async def main(aeng):
        stream = await aeng.add_request([5, 6, 7, 8], long)
        async with stream:
            out = await stream.__anext__()
            during = await _pages_used(aeng)
        # leaving the block aborted it; the abort is handled before the next command
        after = await _pages_used(aeng)
        return out, during, after

    out, during, after = run(main, engine)
    assert not out.finished and during[0] > 0
    assert after[0] == 0


def test_cancelled_consumer_aborts_its_request(engine):
    long = SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)

    async def main(aeng):
        got_one = asyncio.Event()

        async def consume():
            async for _ in aeng.generate([5, 6, 7], long):
                got_one.set()

        task = asyncio.create_task(consume())
        await got_one.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return await _pages_used(aeng)

    assert run(main, engine)[0] == 0


def test_bad_input_raises_and_engine_keeps_serving(engine, reference):
    async def main(aeng):
        with pytest.raises(ValueError, match="prompt"):
            await aeng.add_request([], GREEDY)
        with pytest.raises(ValueError, match="prompt"):
            await aeng.add_request([1] * 500, GREEDY)
        return await _collect(aeng, PROMPTS[1], GREEDY)

    assert run(main, engine).outputs[0].token_ids == reference[1]


def test_step_failure_fails_in_flight_requests_and_loop_keeps_serving(engine, reference):
    rec = Recorder()

    async def main(aeng):
        def break_runner_once(e):
            original = e.runner.dispatch

            def failing(sched_out):
                e.runner.dispatch = original
                raise RuntimeError("injected device fault")
            e.runner.dispatch = failing

        await aeng.call(break_runner_once)
        with pytest.raises(RequestFailedError, match="injected device fault"):
            await _collect(aeng, PROMPTS[2], GREEDY)
        after_fail = await _pages_used(aeng)
        again = await _collect(aeng, PROMPTS[2], GREEDY)
        return after_fail, again

    after_fail, again = run(main, engine, stats=rec)
    assert after_fail[0] == 0
    assert again.outputs[0].token_ids == reference[2]
    assert rec.finished[0].finish_reasons == ("error",)


def test_shutdown_drains_in_flight_and_refuses_new(engine, reference):
    async def main(aeng):
        task = asyncio.create_task(_collect(aeng, PROMPTS[3], GREEDY))
        await asyncio.sleep(0)           # let the request be queued before draining starts
        aeng.begin_drain()
        with pytest.raises(EngineDrainingError):
            await aeng.add_request(PROMPTS[0], GREEDY)
        assert not aeng.is_healthy
        await aeng.shutdown(timeout_s=30.0)
        out = await task
        with pytest.raises(EngineDrainingError):
            await aeng.add_request(PROMPTS[0], GREEDY)
        return out, aeng

    out, aeng = run(main, engine, shutdown=False)
    assert out.outputs[0].token_ids == reference[3]
    assert not aeng._thread.is_alive()


def test_shutdown_deadline_aborts_the_rest(engine):
    long = SamplingParams(temperature=0.0, max_tokens=110, ignore_eos=True)

    async def main(aeng):
        stream = await aeng.add_request([5, 6, 7, 8], long)
        await stream.__anext__()
        await aeng.shutdown(timeout_s=0.0)
        outs = [o async for o in stream]
        with pytest.raises(EngineDeadError):
            await aeng.call(lambda e: None)
        return outs

    outs = run(main, engine, shutdown=False)
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "abort"
    assert len(outs[-1].outputs[0].token_ids) < 110
    assert engine.stats().kv_pages_used == 0 and not engine.has_unfinished_requests()


def test_idle_loop_does_not_spin(engine):
    async def main(aeng):
        await _collect(aeng, PROMPTS[0], GREEDY)
        t_cpu = time.process_time()
        await asyncio.sleep(0.5)
        return time.process_time() - t_cpu

    assert run(main, engine) < 0.1


def test_engine_thread_is_the_only_caller(engine):
    async def main(aeng):
        return await aeng.call(lambda e: threading.current_thread().name)

    assert run(main, engine) == "jserve-engine"


def test_ttft_comes_from_the_engine_outputs(engine):
    rec = Recorder()

    async def main(aeng):
        return await asyncio.gather(*[_collect(aeng, p, GREEDY) for p in PROMPTS[:2]])

    outs = run(main, engine, stats=rec)
    ttfts = {o.request_id: o.metrics["first_token_time"] - o.metrics["arrival_time"] for o in outs}
    assert sorted(rec.ttfts) == sorted(ttfts.values())
    assert {s.request_id: s.ttft_seconds for s in rec.finished} == ttfts


def test_health_and_stats_api(engine):
    async def main(aeng):
        seen = [aeng.health()]
        await _collect(aeng, PROMPTS[0], GREEDY)
        stats = await aeng.stats()
        aeng.begin_drain()
        seen.append(aeng.health())
        return seen, stats, aeng.startup

    seen, stats, startup = run(main, engine)
    assert seen == [EngineHealth.SERVING, EngineHealth.DRAINING]
    assert stats.kv_pages_used == 0 and stats.num_running == stats.num_waiting == 0
    assert stats.kv_pages_total == startup.kv_pages_total == engine.startup.kv_pages_total


def test_health_reports_a_crashed_loop(engine):
    async def main(aeng):
        aeng._send("not a command")        # a bug in the loop: it stops, failing everything
        await asyncio.to_thread(aeng._thread.join, 10)
        with pytest.raises(EngineDeadError):
            await aeng.add_request(PROMPTS[0], GREEDY)
        return aeng.health(), aeng.is_healthy

    assert run(main, engine, shutdown=False) == (EngineHealth.STOPPED, False)
