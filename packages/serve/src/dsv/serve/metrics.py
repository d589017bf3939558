"""Prometheus metrics of one server (its own registry, so several apps can live in one process).

Gauges read the backend when scraped: queue depth, running requests, cache blocks in use, the
usage ratio and prefix-cache hits. Histograms: time to first token, inter-token latency and each
choice's duration. Counters: prompt and output tokens, finished choices by finish reason
(``stop``, ``length``, ``error``, ``cancelled`` for a client gone or a timeout), and error
responses by HTTP status. ``dsv_tokens_per_second`` is the output rate over the last 10 s.

Beside them, the names vLLM exports (``vllm:num_requests_running``, ``vllm:num_requests_waiting``,
``vllm:gpu_cache_usage_perc`` and ``vllm:kv_cache_usage_perc``, ``vllm:prefix_cache_queries`` and
``vllm:prefix_cache_hits`` in tokens, ``vllm:time_to_first_token_seconds``,
``vllm:inter_token_latency_seconds`` and ``vllm:time_per_output_token_seconds``,
``vllm:prompt_tokens_total``, ``vllm:generation_tokens_total``), labelled ``model_name``, so
dashboards and autoscalers written for vLLM read a dsv server unchanged.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["Metrics"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self, backend: Any, model_name: str = "") -> None:
        self.registry = r = CollectorRegistry()
        self.backend = backend
        self.model_name = model_name
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
        self.preemptions = Counter(
            "dsv_preemptions", "Requests preempted (recomputed later) because cache blocks ran out", registry=r
        )
        self._preempted_seen = 0
        self.prefix_hits = Gauge(
            "dsv_prefix_cache_hit_blocks",
            "Prompt blocks served from the prefix cache since start",
            registry=r,
        )

        # vLLM's names (see the module docstring); the histograms are observed with dsv's.
        m = ["model_name"]
        self.v_running = Gauge("vllm:num_requests_running", "Requests running on the engine", m, registry=r)
        self.v_waiting = Gauge("vllm:num_requests_waiting", "Requests waiting for the engine", m, registry=r)
        self.v_cache = Gauge("vllm:gpu_cache_usage_perc", "KV cache usage (1 = full)", m, registry=r)
        self.v_kv_cache = Gauge("vllm:kv_cache_usage_perc", "KV cache usage (1 = full)", m, registry=r)
        self.v_prefix_queries = Counter(
            "vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache", m, registry=r
        )
        self.v_prefix_hits = Counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache", m, registry=r)
        self.v_ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token", m,
                                buckets=_LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.v_itl = Histogram("vllm:inter_token_latency_seconds", "Time between output tokens", m,
                               buckets=_LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.v_tpot = Histogram("vllm:time_per_output_token_seconds", "Time per output token", m,
                                buckets=_LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.v_preemptions = Counter("vllm:num_preemptions", "Requests preempted", m, registry=r)
        self.v_prompt = Counter("vllm:prompt_tokens", "Prompt tokens", m, registry=r)
        self.v_generation = Counter("vllm:generation_tokens", "Generated tokens", m, registry=r)

        # The labelled children, looked up once: these are updated per streamed piece.
        name = model_name
        self._ttft, self._itl, self._tpot = (h.labels(name) for h in (self.v_ttft, self.v_itl, self.v_tpot))
        self._gen, self._prompt = self.v_generation.labels(name), self.v_prompt.labels(name)
        self._queries, self._hits = self.v_prefix_queries.labels(name), self.v_prefix_hits.labels(name)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)
        self._ttft.observe(seconds)

    def next_token(self, seconds: float) -> None:
        self.itl.observe(seconds)
        self._itl.observe(seconds)
        self._tpot.observe(seconds)

    def generated(self, n: int) -> None:
        self.tokens.inc(n)
        self._gen.inc(n)

    def prompt(self, n: int) -> None:
        """``n`` prompt tokens admitted."""
        self.prompt_tokens.inc(n)
        self._prompt.inc(n)

    def prefix_lookup(self, queried: int, hit: int) -> None:
        self._queries.inc(queried)
        self._hits.inc(hit)

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
                f"prefix hits {s.get('prefix_hit_blocks', 0):.0f} blocks · preempted {s.get('preemptions', 0):.0f}")  # fmt: skip

    def render(self) -> bytes:
        s = self.backend.stats()
        self.queue.set(s.get("waiting", 0))
        self.running.set(s.get("running", 0))
        self.used.set(s.get("used_blocks", 0))
        self.usage.set(_cache_usage(s))
        self.prefix_hits.set(s.get("prefix_hit_blocks", 0))
        # The engine counts preemptions; the counters take what happened since the last scrape.
        total = int(s.get("preemptions", 0))
        if total > self._preempted_seen:
            self.preemptions.inc(total - self._preempted_seen)
            self.v_preemptions.labels(self.model_name).inc(total - self._preempted_seen)
            self._preempted_seen = total
        name = self.model_name
        self.v_running.labels(name).set(s.get("running", 0))
        self.v_waiting.labels(name).set(s.get("waiting", 0))
        self.v_cache.labels(name).set(_cache_usage(s))
        self.v_kv_cache.labels(name).set(_cache_usage(s))
        return generate_latest(self.registry)


def _cache_usage(stats: dict[str, float]) -> float:
    """Fraction of the cache's blocks in use, from a backend's ``stats()`` (0 when it has none)."""
    total = stats.get("num_blocks", 0)
    return stats.get("used_blocks", 0) / total if total else 0.0
