"""PrometheusStats: jserve's engine statistics as Prometheus metrics (served at GET /metrics).

Where it sits: a ``jserve.metrics.StatsListener`` handed to ``AsyncEngine``; its methods run on
the engine thread (prometheus-client is thread-safe). Each instance owns its registry (no
process-global state), so several servers in one process (tests) never mix their numbers.

Names follow vLLM's with a ``jserve:`` prefix:
    jserve:num_requests_running / _waiting     gauge      sequences running / queued
    jserve:kv_cache_pages_used / _free          gauge      KV pool pages
    jserve:kv_cache_usage_perc                  gauge      used / total pages
    jserve:prompt_tokens_total                  counter    prompt tokens prefilled
    jserve:generation_tokens_total              counter    tokens generated
    jserve:num_preemptions_total                counter
    jserve:request_success_total{finished_reason}  counter
    jserve:time_to_first_token_seconds          histogram
    jserve:inter_token_latency_seconds          histogram
    jserve:e2e_request_latency_seconds          histogram
    jserve:step_duration_seconds                histogram  one engine step
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from jserve.metrics import RequestStats, StepStats

CONTENT_TYPE = CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_STEP_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


# EngineStats.kv_cache keys (LLMEngine.kv_cache_stats()) exported as counters (monotonic in the
# engine) and gauges.
KV_COUNTERS = {
    "prefix_cache_queries": "Prompt tokens looked up in the prefix cache.",
    "prefix_cache_hits_device": "Prompt tokens served from cached pages on the device.",
    "prefix_cache_hits_host": "Prompt tokens served from the host-memory KV tier.",
    "cow_copies": "Copy-on-write page copies.",
    "pages_swapped_out": "KV pages swapped out to host memory on preemption.",
    "pages_swapped_in": "KV pages swapped back in on resume.",
    "host_tier_pages_loaded": "Pages loaded from the host KV tier.",
    "host_tier_pages_offloaded": "Pages evicted from the device into the host KV tier.",
    "device_evictions": "Cached pages evicted from the device pool.",
    "host_tier_evictions": "Pages evicted from the host KV tier.",
    "preemptions_swap": "Preemptions served by swapping.",
    "preemptions_recompute": "Preemptions served by recomputation.",
    # speculative decoding (present only when it is configured): acceptance rate =
    # accepted / draft tokens, mean accepted length = 1 + accepted / drafts
    "spec_decode_num_drafts": "Speculative decoding: draft sequences verified (one per row).",
    "spec_decode_num_draft_tokens": "Speculative decoding: draft tokens verified.",
    "spec_decode_num_accepted_tokens": "Speculative decoding: draft tokens accepted.",
    "spec_decode_num_emitted_tokens": "Speculative decoding: tokens emitted by verify rows.",
}
KV_GAUGES = {
    "pages_cached_evictable": "Cached pages no request holds (reusable, evictable).",
    "host_tier_pages": "Pages held in the host KV tier.",
    "swap_slots_used": "Host swap slots in use.",
    "swap_slots_total": "Host swap slots.",
}


class PrometheusStats:
    def __init__(self, model_name: str, total_pages: int) -> None:
        """``total_pages``: usable KV pages (``StartupInfo.kv_pages_total``), shown free until
        the first step reports ``EngineStats``."""
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ["model_name"]
        reg = self.registry

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, labels, registry=reg).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, labels, registry=reg).labels(model_name)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=reg).labels(model_name)

        self.running = gauge("jserve:num_requests_running", "Sequences in the running batch.")
        self.waiting = gauge("jserve:num_requests_waiting", "Sequences waiting (new or preempted).")
        self.pages_used = gauge("jserve:kv_cache_pages_used", "KV cache pages in use.")
        self.pages_free = gauge("jserve:kv_cache_pages_free", "KV cache pages free.")
        self.usage = gauge("jserve:kv_cache_usage_perc", "Fraction of KV cache pages in use (0-1).")
        self.prompt_tokens = counter("jserve:prompt_tokens", "Prompt tokens prefilled.")
        self.generation_tokens = counter("jserve:generation_tokens", "Tokens generated.")
        self.preemptions = counter("jserve:num_preemptions", "Requests preempted (recompute).")
        self._success = Counter("jserve:request_success", "Finished sequences by finish reason.",
                                ["model_name", "finished_reason"], registry=reg)
        self.ttft = histogram("jserve:time_to_first_token_seconds", "Time to first token.",
                              _LATENCY_BUCKETS)
        self.itl = histogram("jserve:inter_token_latency_seconds", "Time between two output tokens.",
                             _LATENCY_BUCKETS)
        self.e2e = histogram("jserve:e2e_request_latency_seconds", "Arrival to last output.",
                             _LATENCY_BUCKETS)
        self.step = histogram("jserve:step_duration_seconds", "Duration of one engine step.",
                              _STEP_BUCKETS)
        self._kv_counters = {k: counter(f"jserve:{k}", doc) for k, doc in KV_COUNTERS.items()}
        self._kv_gauges = {k: gauge(f"jserve:kv_{k}", doc) for k, doc in KV_GAUGES.items()}
        self._kv_last: dict[str, int] = {}
        self._model = model_name
        self._last_preemptions = 0
        self.pages_free.set(total_pages)

    # ---------------------------------------------------------------- StatsListener
    def on_step(self, s: StepStats) -> None:
        e = s.engine
        self.step.observe(s.step_seconds)
        self.running.set(e.num_running)
        self.waiting.set(e.num_waiting)
        self.pages_used.set(e.kv_pages_used)
        self.pages_free.set(e.kv_pages_free)
        self.usage.set(e.kv_usage)
        for key, value in e.kv_cache.items():
            if key in self._kv_counters:
                delta = value - self._kv_last.get(key, 0)
                if delta > 0:
                    self._kv_counters[key].inc(delta)
                self._kv_last[key] = value
            elif key in self._kv_gauges:
                self._kv_gauges[key].set(value)
        if e.num_preemptions_total > self._last_preemptions:
            self.preemptions.inc(e.num_preemptions_total - self._last_preemptions)
            self._last_preemptions = e.num_preemptions_total

    def on_first_token(self, ttft_seconds: float, prompt_tokens: int) -> None:
        self.ttft.observe(ttft_seconds)
        self.prompt_tokens.inc(prompt_tokens)

    def on_token_gaps(self, gaps_seconds: list[float], num_tokens: int) -> None:
        for g in gaps_seconds:
            self.itl.observe(g)
        self.generation_tokens.inc(num_tokens)

    def on_request_finished(self, s: RequestStats) -> None:
        self.e2e.observe(s.e2e_seconds)
        for reason in s.finish_reasons:
            self._success.labels(self._model, reason).inc()

    # ---------------------------------------------------------------- exposition
    def render(self) -> bytes:
        return generate_latest(self.registry)
