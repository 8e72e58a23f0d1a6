"""What /metrics exports (vLLM's series under jserve: names), the Grafana dashboard that reads
them, and the periodic engine stats line. No engine: the exporter and the loggers are fed
directly."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from jserve.engine_api import EngineStats
from jserve.metrics import RequestMetrics, StatsLogger
from jserve.outputs import CompletionOutput, RequestOutput
from server.metrics import PrometheusStats, token_buckets

DASHBOARD = Path(__file__).resolve().parents[2] / "examples" / "grafana" / "jserve_dashboard.json"
CACHE = {"block_size": "16", "cache_dtype": "bfloat16", "enable_prefix_caching": "True",
         "gpu_memory_utilization": "0.85", "num_gpu_blocks": "100", "swap_space_gb": "4.0",
         "host_kv_cache_gb": "0.0", "preemption_mode": "swap"}
VLLM_SERIES = ("request_queue_time_seconds", "request_prefill_time_seconds", "request_decode_time_seconds",
               "time_per_output_token_seconds", "request_prompt_tokens", "request_generation_tokens",
               "iteration_tokens_total")


def _exported() -> tuple[set[str], dict[str, str]]:
    """(every sample name the exporter writes, metric family name -> type)."""
    stats = PrometheusStats("m", 100, max_model_len=4096, cache_config=CACHE)
    samples, types = set(), {}
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
    for family in stats.registry.collect():     # a labelled series with no child yet has no samples
        types[family.name] = family.type
        samples.update(s.name for s in family.samples)
        samples.update(family.name + x for x in suffixes.get(family.type, ()))
    return samples, types


def test_vllm_series_are_exported_under_the_same_stems():
    samples, types = _exported()
    for stem in VLLM_SERIES:
        assert types.get(f"jserve:{stem}") == "histogram", stem
        assert f"jserve:{stem}_bucket" in samples
    assert types["jserve:cache_config_info"] == "gauge"
    text = PrometheusStats("m", 100, cache_config=CACHE).render().decode()
    line = next(s for s in text.splitlines() if s.startswith("jserve:cache_config_info{"))
    assert 'block_size="16"' in line and 'enable_prefix_caching="True"' in line and line.endswith(" 1.0")


def test_every_dashboard_query_names_an_exported_metric():
    samples, _ = _exported()
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs += [v["query"] for v in dash["templating"]["list"]]
    assert len(exprs) >= 15
    named = set()
    for expr in exprs:
        names = re.findall(r"jserve:[A-Za-z0-9_:]+", expr)
        assert names, f"a query without a jserve metric: {expr}"
        named.update(names)
    missing = sorted(n for n in named if n not in samples)
    assert not missing, f"the dashboard queries metrics the server does not export: {missing}"
    for stem in VLLM_SERIES:                      # and every new series is on the dashboard
        assert f"jserve:{stem}_bucket" in named, stem


def test_token_buckets_are_vllms_1_2_5_series():
    assert token_buckets(100) == (1, 2, 5, 10, 20, 50, 100)
    assert token_buckets(4096)[-1] == 2000


def test_request_stats_split_queue_prefill_decode():
    m = RequestMetrics(None)
    m.added("r", 10.0)
    comp = CompletionOutput(0, "x", [1, 2, 3], finish_reason="length")
    out = RequestOutput("r", None, [5, 6], [comp], finished=True,
                        metrics={"arrival_time": 10.0, "scheduled_time": 10.5, "first_token_time": 11.0})
    s = m.observe(out, 14.0)
    assert (s.queue_seconds, s.prefill_seconds, s.decode_seconds) == (0.5, 0.5, 3.0)
    assert (s.prompt_tokens, s.generation_tokens) == (2, 3)
    assert (m.prompt_tokens_total, m.generation_tokens_total) == (2, 3)


def _stats(running=3, waiting=1):
    return EngineStats(num_running=running, num_waiting=waiting, kv_pages_used=25, kv_pages_free=75,
                       kv_pages_total=100, num_preemptions_total=0)


def test_engine_stats_line_every_interval_while_busy(caplog):
    caplog.set_level(logging.INFO, logger="jserve.metrics")
    slog = StatsLogger(10.0)
    assert slog.step(_stats(), 0, 0, now=100.0) is None          # starts the interval
    assert slog.step(_stats(), 500, 100, now=105.0) is None       # not due yet
    line = slog.step(_stats(), 1000, 400, now=110.0)
    assert line == ("engine: 3 running, 1 waiting, KV cache 25.0% used, prompt 100.0 tok/s, "
                    "generation 40.0 tok/s")
    assert line in caplog.text
    slog.idle()                                                    # idle: no line, fresh interval
    assert slog.step(_stats(), 1000, 400, now=500.0) is None
    assert StatsLogger(0).step(_stats(), 0, 0, now=1e9) is None    # 0 = off
