"""Prometheus metrics of a replica. Labels are model names and statuses only, never request text."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("ember_requests", "Requests answered", ["model", "status"], registry=self.registry)
        self.tokens = Counter("ember_tokens", "Tokens processed", ["model", "kind"], registry=self.registry)
        self.queue_depth = Gauge("ember_queue_depth", "Requests waiting for the engine", registry=self.registry)
        self.running = Gauge("ember_running_requests", "Requests in the running batch", registry=self.registry)
        self.latency = Histogram("ember_request_latency_seconds", "Request latency", ["model"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.ttft = Histogram("ember_time_to_first_token_seconds", "Time to first token", ["model"],
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        self.adapters = Gauge("ember_loaded_adapters", "LoRA addons served by this replica", registry=self.registry)
        self.time_per_output_token = Histogram(
            "ember_time_per_output_token_seconds", "Mean time between a request's output tokens (inter-token latency)",
            ["model"], buckets=TOKEN_BUCKETS, registry=self.registry)
        self.finished = Counter("ember_request_finished", "Choices finished, by reason (stop, length, abort)",
                                ["model", "reason"], registry=self.registry)
        self.kv_cache_usage = Gauge("ember_kv_cache_usage_ratio", "Share of the KV cache's blocks in use",
                                    registry=self.registry)
        self.prefix_cache_hits = Gauge("ember_prefix_cache_hit_tokens",
                                       "Tokens whose K/V came from the prefix cache since the replica started",
                                       registry=self.registry)
        self.preemptions = Gauge("ember_preemptions", "Sequences preempted (KV cache full) since the replica started",
                                 registry=self.registry)
