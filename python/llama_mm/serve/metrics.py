"""Prometheus metrics (prometheus-client text format at /metrics): the engine's gauges and counters read from
BatchEngine.stats() at scrape time, and the server's own latency histograms and finish-reason counter. Each app
has its own registry, so several servers can live in one process (tests)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

PREFIX = "llama_mm"
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.5,
                    5.0, 10.0, 30.0, 60.0)

# BatchEngine.stats() key -> (metric suffix, kind, help)
_ENGINE_STATS = {
    "running": ("requests_running", "gauge", "Requests in the running batch"),
    "waiting": ("requests_waiting", "gauge", "Requests queued for admission"),
    "waiting_for_blocks": ("requests_waiting_for_kv_blocks", "gauge",
                           "Running requests that could not take a KV cache block at the last step"),
    "kv_blocks_used": ("kv_blocks_used", "gauge", "Self-attention KV cache blocks in use"),
    "kv_blocks_total": ("kv_blocks_total", "gauge", "Self-attention KV cache blocks in the pool"),
    "kv_block_size": ("kv_block_size_tokens", "gauge", "Tokens per KV cache block"),
    "tokens_generated": ("generated_tokens", "counter", "Tokens generated since start"),
    "requests_finished": ("engine_requests_finished", "counter", "Requests the engine has finished"),
    "image_cache_hits": ("image_cache_hits", "counter", "Images whose encoding (cross-layer K/V) came from the cache"),
    "image_cache_misses": ("image_cache_misses", "counter", "Images encoded (vision tower and cross-layer K/V)"),
}


class _EngineCollector:
    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        stats = self.engine.stats()
        for key, (name, kind, doc) in _ENGINE_STATS.items():
            if key in stats:
                family = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
                yield family(f"{PREFIX}_{name}", doc, value=stats[key])


class Metrics:
    def __init__(self, engine):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine))
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds", "From the request's arrival (body parsed) to its first token",
                              buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.per_token = Histogram(f"{PREFIX}_time_per_output_token_seconds", "Between consecutive tokens of a request",
                                   buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.finish = Counter(f"{PREFIX}_requests_finished", "Requests (choices) by finish reason",
                              ["finish_reason"], registry=self.registry)

    def token_latency(self, since: float, now: float, first: bool) -> None:
        (self.ttft if first else self.per_token).observe(now - since)

    def finished(self, reason: str) -> None:
        self.finish.labels(finish_reason=reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
