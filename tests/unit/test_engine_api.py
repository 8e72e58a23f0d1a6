"""The engine's narrow API for front-ends: StartupInfo, EngineStats, RequestMetrics, and a scan
that keeps server/ and the async engine off the engine's internals (DESIGN: "Server")."""

import dataclasses
import re
from pathlib import Path

import pytest

from jserve.engine import LLMEngine
from jserve.engine_api import BuildInfo, EngineStats
from jserve.metrics import RequestMetrics
from jserve.outputs import CompletionOutput, RequestOutput
from jserve.sampling_params import SamplingParams

REPO = Path(__file__).resolve().parents[2]
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


# ------------------------------------------------------------------ boundary scan
FRONT_ENDS = sorted((REPO / "server").rglob("*.py")) + [REPO / "jserve" / "async_engine.py"]
FORBIDDEN = [   # in server/ and jserve/async_engine.py
    (re.compile(r"\.(scheduler|pool|runner)\b"), "an engine's scheduler / pool / runner"),
    (re.compile(r"\bgetattr\(\s*(self\.)?_?a?eng(ine)?\b"), "getattr probing of an engine"),
    (re.compile(r"jserve\.(scheduler|page_pool|runner|kv_manager|kv_cache|prefix_cache)\b"),
     "an engine-internal module"),
]
SERVER_ONLY = [(re.compile(r"\.engine\.engine\b|\._engine\b"), "the AsyncEngine's LLMEngine")]


def _violations(name: str, text: str) -> list[str]:
    rules = FORBIDDEN + (SERVER_ONLY if name.startswith("server/") else [])
    return [f"{name}:{n}: {what}: {line.strip()}"
            for n, line in enumerate(text.splitlines(), start=1)
            for pattern, what in rules if pattern.search(line)]


def test_front_ends_use_only_the_narrow_engine_api():
    assert len(FRONT_ENDS) > 10
    bad = [v for path in FRONT_ENDS for v in _violations(str(path.relative_to(REPO)), path.read_text())]
    assert not bad, "front-ends reach into the engine:\n" + "\n".join(bad)


def test_the_scan_catches_what_it_forbids():
    bad = ["n = eng.pool.num_total", "plan = getattr(eng, 'pool_plan', None)", "e = self.engine.engine",
           "x = self.engine._engine.runner", "from jserve.page_pool import PagePool",
           "s = engine.scheduler.max_model_len"]
    assert all(_violations("server/x.py", line) for line in bad)
    ok = "stats = await self.engine.stats()\nn = self.engine.startup.kv_pages_total\nself._engine = engine"
    assert [v.split(":")[1] for v in _violations("server/x.py", ok)] == ["3"]
    assert _violations("jserve/async_engine.py", ok) == []


# ------------------------------------------------------------------ tiny engine
@pytest.fixture(scope="module")
def engine(make_engine):
    return make_engine("llama")    # num_pages=80, page_size 16, max_model_len 128, max_num_seqs 8


def test_startup_info_comes_from_build_engine(engine):
    s = engine.startup
    assert (s.kv_pages_total, s.kv_tokens_total) == (79, 79 * 16)
    assert s.max_model_len == engine.max_model_len == 128
    assert s.max_num_seqs == 8
    assert s.describe_pool().startswith("KV pool: 80 pages x 16 tokens (79 usable, page 0 null)")
    assert s.startup_seconds >= s.compile_seconds > 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.max_model_len = 1


def test_startup_without_build_info_derives_the_pool_and_caps_max_model_len(engine):
    same = LLMEngine(engine.config, engine.runner, engine.tokenizer, 80)
    assert same.startup.pool_plan == engine.startup.pool_plan
    assert (same.startup.startup_seconds, same.startup.compile_seconds) == (0.0, 0.0)
    small = LLMEngine(engine.config, engine.runner, engine.tokenizer, 5)   # 4 usable pages
    assert small.max_model_len == small.startup.max_model_len == 4 * 16
    built = LLMEngine(engine.config, engine.runner, engine.tokenizer, 80,
                      BuildInfo(engine.startup.pool_plan, startup_seconds=3.0, compile_seconds=2.0))
    assert (built.startup.startup_seconds, built.startup.compile_seconds) == (3.0, 2.0)


def test_stats_snapshot_follows_the_engine(engine):
    idle = engine.stats()
    assert isinstance(idle, EngineStats)
    assert (idle.num_running, idle.num_waiting, idle.kv_pages_used) == (0, 0, 0)
    assert idle.kv_pages_free == idle.kv_pages_total == engine.startup.kv_pages_total
    assert "prefix_cache_queries" in idle.kv_cache and idle.kv_usage == 0.0
    with pytest.raises(TypeError):
        idle.kv_cache["cow_copies"] = 1     # a snapshot, read-only

    engine.add_request("a", [5, 6, 7, 8], GREEDY)
    engine.add_request("b", [9, 10, 11], GREEDY)
    assert engine.stats().num_waiting == 2
    engine.step()
    busy = engine.stats()
    assert busy.num_running == 2 and busy.num_waiting == 0
    assert busy.kv_pages_used == 2 and busy.kv_pages_used + busy.kv_pages_free == busy.kv_pages_total
    assert busy.kv_usage == pytest.approx(2 / 79)
    assert idle.num_waiting == 0            # earlier snapshots do not change
    while engine.has_unfinished_requests():
        engine.step()
    done = engine.stats()
    assert done.kv_pages_used == 0 and done.num_running == 0
    assert done.kv_cache["prefix_cache_queries"] > idle.kv_cache["prefix_cache_queries"]


# ------------------------------------------------------------------ RequestMetrics
class Recorder:
    def __init__(self):
        self.events = []

    def on_step(self, s):
        self.events.append(("step", s.step_seconds))

    def on_first_token(self, ttft, prompt_tokens):
        self.events.append(("first", ttft, prompt_tokens))

    def on_token_gaps(self, gaps, n):
        self.events.append(("gaps", gaps, n))

    def on_request_finished(self, s):
        self.events.append(("done", s))


def _out(tokens: list[list[int]], metrics: dict, finished: bool = False) -> RequestOutput:
    comps = [CompletionOutput(i, "", t, finish_reason="length" if finished else None)
             for i, t in enumerate(tokens)]
    return RequestOutput("r", None, [1, 2, 3], comps, finished=finished, metrics=metrics)


def test_request_metrics_read_times_from_the_engine_outputs():
    rec = Recorder()
    m = RequestMetrics(rec)
    m.added("r", arrival_time=100.0)
    assert m.observe(_out([[], []], {"arrival_time": 100.0}), now=100.5) is None
    # The engine stamped the first token at 100.25: TTFT is the engine's, not the observer's clock.
    first = {"arrival_time": 100.0, "first_token_time": 100.25}
    m.observe(_out([[7], []], first), now=101.0)
    m.observe(_out([[7, 8], [9]], first), now=101.5)
    stats = m.observe(_out([[7, 8, 10], [9, 11]], first, finished=True), now=102.0)
    assert rec.events == [
        ("first", 0.25, 3),
        ("gaps", [], 1),
        ("gaps", [0.5], 2),
        ("gaps", [0.5, 0.5], 2),
        ("done", stats),
    ]
    assert stats.finish_reasons == ("length", "length")
    assert (stats.prompt_tokens, stats.generation_tokens) == (3, 5)
    assert (stats.ttft_seconds, stats.e2e_seconds) == (0.25, 2.0)


def test_request_metrics_failed_and_unknown_requests():
    rec = Recorder()
    m = RequestMetrics(rec)
    assert m.observe(_out([[1]], {"arrival_time": 0.0}), now=1.0) is None    # never added: ignored
    m.added("r", arrival_time=10.0)
    failed = m.failed("r", now=12.0)
    assert (failed.finish_reasons, failed.ttft_seconds, failed.e2e_seconds) == (("error",), None, 2.0)
    assert rec.events == [("done", failed)]
    assert m.failed("r", now=13.0) is None


def test_a_failing_listener_never_breaks_the_engine_side():
    class Broken(Recorder):
        def on_first_token(self, ttft, prompt_tokens):
            raise RuntimeError("listener bug")

    m = RequestMetrics(Broken())
    m.added("r", 0.0)
    stats = m.observe(_out([[5]], {"arrival_time": 0.0, "first_token_time": 0.5}, finished=True), now=1.0)
    assert stats.ttft_seconds == 0.5
