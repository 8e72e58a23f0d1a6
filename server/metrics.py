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
    jserve:time_per_output_token_seconds        histogram  same samples as inter_token_latency
                                                           (vLLM's older name, kept by vLLM too)
    jserve:request_queue_time_seconds           histogram  arrival -> first scheduled
    jserve:request_prefill_time_seconds         histogram  first scheduled -> first token
    jserve:request_decode_time_seconds          histogram  first token -> last output
    jserve:request_prompt_tokens                histogram  per finished request
    jserve:request_generation_tokens            histogram  per finished request (all n sequences)
    jserve:iteration_tokens_total               histogram  tokens (prefill + decode) per step
    jserve:cache_config_info                    gauge = 1  labels: the KV cache configuration
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from jserve.metrics import RequestStats, StepStats

CONTENT_TYPE = CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_REQUEST_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0,
                    320.0, 640.0, 1280.0)
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

# Disaggregation (jserve/disagg/, docs/disaggregation.md): per-group gauges and handoff counters,
# exported as ``jserve:<key>`` (counters with ``_total``); 0 on a colocated engine.
DISAGG_GAUGES = {
    f"disagg_{group}_{key}": f"{group.capitalize()} group: {doc}"
    for group in ("prefill", "decode")
    for key, doc in (("num_running", "sequences running (prefill: including prefilled ones "
                                     "waiting for the handoff)."),
                     ("num_waiting", "sequences waiting (new or preempted)."),
                     ("pages_used", "KV pages in use."), ("pages_total", "usable KV pages."))
} | {"disagg_handoffs_waiting": "Prefilled sequences waiting for room on the decode group.",
     "disagg_transfers_in_flight": "KV page transfers whose bytes have not reached the decode group."}
DISAGG_COUNTERS = {
    "disagg_handoffs": "Sequences handed from the prefill group to the decode group.",
    "disagg_transfer_pages": "KV pages copied from the prefill group to the decode group.",
    "disagg_transfer_bytes": "KV bytes copied from the prefill group to the decode group.",
    "disagg_transfer_us": "Microseconds from dispatching a KV transfer to its bytes on the decode "
                          "group, as the engine loop observes it (summed over transfers).",
    "disagg_prefetched_handoffs": "Handoffs whose pages were gathered right behind the prefill "
                                  "step that completed the prompt.",
}


def token_buckets(max_value: int) -> tuple[int, ...]:
    """vLLM's 1-2-5 series up to ``max_value``: 1, 2, 5, 10, 20, 50, ..."""
    out, exp = [], 0
    while True:
        for m in (1, 2, 5):
            v = m * 10 ** exp
            if v > max_value:
                return tuple(out)
            out.append(v)
        exp += 1


def cache_config_labels(engine: Any) -> dict[str, str]:
    """``cache_config_info``'s labels (vLLM's names where it has one) from an engine's config
    and start-up facts (``LLMEngine`` or ``AsyncEngine``)."""
    cache, startup = engine.config.cache, engine.startup
    return {"block_size": str(cache.page_size), "cache_dtype": str(engine.config.kv_dtype),
            "enable_prefix_caching": str(cache.enable_prefix_caching),
            "gpu_memory_utilization": str(cache.gpu_memory_utilization),
            "num_gpu_blocks": str(startup.kv_pages_total), "swap_space_gb": str(cache.swap_space_gb),
            "host_kv_cache_gb": str(cache.host_kv_cache_gb),
            "preemption_mode": str(cache.preemption_mode)}


class PrometheusStats:
    @classmethod
    def for_engine(cls, model_name: str, engine: Any) -> PrometheusStats:
        """Sized and labelled from an engine (``LLMEngine`` or ``AsyncEngine``)."""
        return cls(model_name, engine.startup.kv_pages_total, max_model_len=engine.startup.max_model_len,
                   cache_config=cache_config_labels(engine))

    def __init__(self, model_name: str, total_pages: int, max_model_len: int = 8192,
                 cache_config: Mapping[str, str] | None = None) -> None:
        """``total_pages``: usable KV pages (``StartupInfo.kv_pages_total``), shown free until
        the first step reports ``EngineStats``; ``max_model_len`` bounds the token histograms;
        ``cache_config``: the labels of ``cache_config_info`` (not exported without it)."""
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
        self.tpot = histogram("jserve:time_per_output_token_seconds",
                              "Time per output token (the inter-token latency; vLLM's older name).",
                              _LATENCY_BUCKETS)
        self.queue_time = histogram("jserve:request_queue_time_seconds",
                                    "Arrival to first scheduled.", _REQUEST_BUCKETS)
        self.prefill_time = histogram("jserve:request_prefill_time_seconds",
                                      "First scheduled to first token.", _REQUEST_BUCKETS)
        self.decode_time = histogram("jserve:request_decode_time_seconds",
                                     "First token to last output.", _REQUEST_BUCKETS)
        tokens = token_buckets(max_model_len)
        self.request_prompt_tokens = histogram("jserve:request_prompt_tokens",
                                               "Prompt tokens of each finished request.", tokens)
        self.request_generation_tokens = histogram(
            "jserve:request_generation_tokens", "Generated tokens of each finished request.", tokens)
        self.iteration_tokens = histogram("jserve:iteration_tokens_total",
                                          "Tokens (prefill + decode) per engine step.",
                                          token_buckets(max(max_model_len, 16384)))
        if cache_config is not None:
            Gauge("jserve:cache_config_info", "KV cache configuration (labels; value 1).",
                  sorted(cache_config), registry=reg).labels(**cache_config).set(1)
        self._kv_counters = {k: counter(f"jserve:{k}", doc) for k, doc in KV_COUNTERS.items()}
        self._kv_gauges = {k: gauge(f"jserve:kv_{k}", doc) for k, doc in KV_GAUGES.items()}
        self._kv_counters.update({k: counter(f"jserve:{k}", doc) for k, doc in DISAGG_COUNTERS.items()})
        self._kv_gauges.update({k: gauge(f"jserve:{k}", doc) for k, doc in DISAGG_GAUGES.items()})
        self._kv_last: dict[str, int] = {}
        self._model = model_name
        self._last_preemptions = 0
        self.pages_free.set(total_pages)

    # ---------------------------------------------------------------- StatsListener
    def on_step(self, s: StepStats) -> None:
        e = s.engine
        self.step.observe(s.step_seconds)
        if e.step_tokens:
            self.iteration_tokens.observe(e.step_tokens)
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
            self.tpot.observe(g)
        self.generation_tokens.inc(num_tokens)

    def on_request_finished(self, s: RequestStats) -> None:
        self.e2e.observe(s.e2e_seconds)
        for h, v in ((self.queue_time, s.queue_seconds), (self.prefill_time, s.prefill_seconds),
                     (self.decode_time, s.decode_seconds)):
            if v is not None:
                h.observe(v)
        self.request_prompt_tokens.observe(s.prompt_tokens)
        self.request_generation_tokens.observe(s.generation_tokens)
        for reason in s.finish_reasons:
            self._success.labels(self._model, reason).inc()

    # ---------------------------------------------------------------- exposition
    def render(self) -> bytes:
        return generate_latest(self.registry)
