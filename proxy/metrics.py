"""Prometheus metrics of the proxy, in a registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram


class ProxyMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.decisions = Counter(
            "kvmesh_proxy_routing_decisions", "Prefill routing decisions", ["policy", "reason", "node"], registry=r
        )
        self.ttft = Histogram(
            "kvmesh_proxy_ttft_seconds",
            "Request in to first event relayed",
            registry=r,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16),
        )
        self.stalls = Counter("kvmesh_proxy_stalls", "Calls to a node that stopped answering", registry=r)
        self.migrations = Counter(
            "kvmesh_proxy_migrations",
            "Streams moved to another node after tokens reached the client, by reason",
            ["reason"],
            registry=r,
        )
        self.errors = Counter("kvmesh_proxy_errors", "Calls ended with an error status", ["code"], registry=r)
        self.http_requests = Counter(
            "kvmesh_proxy_http_requests",
            "OpenAI HTTP API requests by endpoint and status",
            ["endpoint", "status"],
            registry=r,
        )
