"""The gateway's Prometheus metrics. Labels are names the store knows (models served, deployments, accounts with keys)
and statuses, never request text, and never a name a caller made up: a request for an unknown model counts under
model="" (a label per made-up name would let anyone grow the series without end)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ember.runtime.serving.metrics import LATENCY_BUCKETS


class GatewayMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("ember_gateway_requests", "Requests answered, by model, deployment and status",
                                ["model", "deployment", "status"], registry=self.registry)
        self.upstream_latency = Histogram(
            "ember_gateway_upstream_latency_seconds", "From sending a request to a replica to its response's head "
            "(a stream's first bytes)", ["deployment"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.retries = Counter("ember_gateway_retries", "Requests tried again on another replica, by why",
                               ["deployment", "reason"], registry=self.registry)
        self.rate_limited = Counter("ember_gateway_rate_limited", "Requests refused by an account's rate limits",
                                    ["account"], registry=self.registry)
        self.open_connections = Gauge("ember_gateway_open_connections", "Client connections open",
                                      registry=self.registry)
        self.scaled = Counter("ember_gateway_scaled", "Replica count changes the autoscaler made, by deployment and "
                              "direction (up, down)", ["deployment", "direction"], registry=self.registry)
        self.held = Gauge("ember_gateway_held_requests", "Requests waiting for a replica of a deployment scaled to zero",
                          ["deployment"], registry=self.registry)
        self.outstanding = Gauge("ember_gateway_outstanding_requests", "Requests sent to replicas and not yet answered",
                                 ["deployment"], registry=self.registry)
