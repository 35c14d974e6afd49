"""Prometheus metrics of one engine (its own registry: two engines can share a process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class EngineMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("ithaca_requests", "Requests accepted into the queue", registry=r)
        self.running = Gauge("ithaca_requests_running", "Requests in a running batch", registry=r)
        self.waiting = Gauge("ithaca_requests_waiting", "Requests waiting in the queue", registry=r)

        def latency(name: str, doc: str, labels: tuple[str, ...] = ()) -> Histogram:
            return Histogram(name, doc, labels, buckets=_LATENCY, registry=r)

        self.queue_time = latency("ithaca_request_queue_time_seconds", "Submit to batch start")
        self.step_latency = latency("ithaca_step_latency_seconds", "One denoising step of a batch")
        self.e2e_latency = latency(
            "ithaca_request_latency_seconds", "Submit to result inside the engine"
        )
        self.http_latency = latency(
            "ithaca_http_request_duration_seconds",
            "HTTP request to response (includes encoding)",
            ("route",),
        )
        self.batch_size = Histogram(
            "ithaca_batch_size",
            "Requests per executed batch",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32),
            registry=r,
        )
        self.failures = Counter(
            "ithaca_request_failures", "Failed requests by reason", ["reason"], registry=r
        )
        self.restarts = Counter(
            "ithaca_worker_group_restarts", "Worker groups restarted after a failure", registry=r
        )
        self.groups_alive = Gauge("ithaca_worker_groups_alive", "Live worker groups", registry=r)

        def per_rank(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, ("group", "rank"), registry=r)

        self.rank_parameter_bytes = per_rank(
            "ithaca_rank_parameter_bytes",
            "Bytes of model parameters a rank holds (its local shard of sharded ones)",
        )
        self.rank_peak_memory = per_rank(
            "ithaca_rank_peak_memory_bytes",
            "A rank's peak memory: CUDA peak allocated, or peak RSS on the CPU",
        )
        self.cache_steps = Counter(
            "ithaca_cache_steps",
            "Transformer forwards under a step cache, by backend and outcome (computed/cached)",
            ["backend", "outcome"],
            registry=r,
        )
        self.cache_hit_ratio = Histogram(
            "ithaca_cache_hit_ratio",
            "Share of a request's transformer forwards served from the step cache",
            ["backend"],
            buckets=(0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
            registry=r,
        )

    def observe_result(self, metadata: dict) -> None:
        """Record what one finished request reports (its step-cache statistics)."""
        cache = metadata.get("cache")
        if cache:
            backend = cache["backend"]
            self.cache_steps.labels(backend, "computed").inc(cache["computed_steps"])
            self.cache_steps.labels(backend, "cached").inc(cache["cached_steps"])
            self.cache_hit_ratio.labels(backend).observe(cache["hit_ratio"])

    def observe_ranks(self, groups: list[dict]) -> None:
        """Set the per-rank memory gauges from ``describe()`` of the engine's groups."""
        for group in groups:
            for rank in group.get("ranks", ()):
                if "parameter_bytes" not in rank:
                    continue  # not reported yet (loading)
                labels = (group["name"], str(rank["rank"]))
                self.rank_parameter_bytes.labels(*labels).set(rank["parameter_bytes"])
                self.rank_peak_memory.labels(*labels).set(rank["peak_memory_bytes"])
