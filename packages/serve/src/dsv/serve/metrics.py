"""Prometheus metrics of one server (its own registry, so several apps can live in one process).

Gauges read the backend when scraped: queue depth, running requests, cache blocks in use and the
usage ratio. Histograms: time to first token and inter-token latency. ``dsv_tokens_per_second``
is the output rate over the last 10 s.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["Metrics"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self, backend: Any) -> None:
        self.registry = r = CollectorRegistry()
        self.backend = backend
        self.ttft = Histogram(
            "dsv_time_to_first_token_seconds", "Time to first token", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.itl = Histogram(
            "dsv_inter_token_latency_seconds",
            "Time between output tokens",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens = Counter("dsv_generated_tokens", "Output tokens generated", registry=r)
        self.tokens_per_s = Gauge(
            "dsv_tokens_per_second", "Output tokens per second over the last 10 s", registry=r
        )
        self.in_flight = Gauge("dsv_requests_in_flight", "HTTP generation requests in flight", registry=r)
        self.queue = Gauge("dsv_queue_depth", "Requests waiting for the engine", registry=r)
        self.running = Gauge("dsv_running_requests", "Sequences being generated", registry=r)
        self.used = Gauge("dsv_cache_used_blocks", "KV cache blocks in use", registry=r)
        self.usage = Gauge("dsv_cache_usage_ratio", "Fraction of KV cache blocks in use", registry=r)

    def render(self) -> bytes:
        s = self.backend.stats()
        self.queue.set(s.get("waiting", 0))
        self.running.set(s.get("running", 0))
        self.used.set(s.get("used_blocks", 0))
        total = s.get("num_blocks", 0)
        self.usage.set(s.get("used_blocks", 0) / total if total else 0.0)
        return generate_latest(self.registry)
