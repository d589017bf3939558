"""Prometheus metrics of one server (its own registry, so several apps can live in one process).

Gauges read the backend when scraped: queue depth, running requests, cache blocks in use, the
usage ratio and prefix-cache hits. Histograms: time to first token, inter-token latency and each
choice's duration. Counters: prompt and output tokens, finished choices by finish reason
(``stop``, ``length``, ``error``, ``cancelled`` for a client gone or a timeout), and error
responses by HTTP status. ``dsv_tokens_per_second`` is the output rate over the last 10 s.
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
        self.duration = Histogram(
            "dsv_choice_duration_seconds",
            "Time from a choice's start to its end",
            buckets=(*_LATENCY_BUCKETS, 60.0, 120.0, 300.0),
            registry=r,
        )
        self.tokens = Counter("dsv_generated_tokens", "Output tokens generated", registry=r)
        self.prompt_tokens = Counter("dsv_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.finished = Counter(
            "dsv_finished_choices", "Choices finished, by finish reason", ["reason"], registry=r
        )
        self.errors = Counter(
            "dsv_error_responses", "Error responses, by HTTP status", ["status"], registry=r
        )
        self.tokens_per_s = Gauge(
            "dsv_tokens_per_second", "Output tokens per second over the last 10 s", registry=r
        )
        self.in_flight = Gauge("dsv_requests_in_flight", "HTTP generation requests in flight", registry=r)
        self.queue = Gauge("dsv_queue_depth", "Requests waiting for the engine", registry=r)
        self.running = Gauge("dsv_running_requests", "Sequences being generated", registry=r)
        self.used = Gauge("dsv_cache_used_blocks", "KV cache blocks in use", registry=r)
        self.usage = Gauge("dsv_cache_usage_ratio", "Fraction of KV cache blocks in use", registry=r)
        self.prefix_hits = Gauge(
            "dsv_prefix_cache_hit_blocks",
            "Prompt blocks served from the prefix cache since start",
            registry=r,
        )

    def totals(self) -> dict[str, float]:
        """Prompt and output tokens counted since start."""
        get = self.registry.get_sample_value
        return {
            "prompt_tokens": get("dsv_prompt_tokens_total") or 0.0,
            "generated_tokens": get("dsv_generated_tokens_total") or 0.0,
        }

    def status_line(self, before: dict[str, float], after: dict[str, float], seconds: float) -> str:
        """One line for the console: token rates between two :meth:`totals` and the engine's state."""
        s = self.backend.stats()
        used = _cache_usage(s)
        prompt = (after["prompt_tokens"] - before["prompt_tokens"]) / seconds
        out = (after["generated_tokens"] - before["generated_tokens"]) / seconds
        return (f"prompt {prompt:,.1f} tok/s · output {out:,.1f} tok/s · running {s.get('running', 0):.0f} · "
                f"waiting {s.get('waiting', 0):.0f} · cache {used:.1%} used · "
                f"prefix hits {s.get('prefix_hit_blocks', 0):.0f} blocks")  # fmt: skip

    def render(self) -> bytes:
        s = self.backend.stats()
        self.queue.set(s.get("waiting", 0))
        self.running.set(s.get("running", 0))
        self.used.set(s.get("used_blocks", 0))
        self.usage.set(_cache_usage(s))
        self.prefix_hits.set(s.get("prefix_hit_blocks", 0))
        return generate_latest(self.registry)


def _cache_usage(stats: dict[str, float]) -> float:
    """Fraction of the cache's blocks in use, from a backend's ``stats()`` (0 when it has none)."""
    total = stats.get("num_blocks", 0)
    return stats.get("used_blocks", 0) / total if total else 0.0
