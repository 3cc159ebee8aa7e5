"""Prometheus metrics of a decode node, in a registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class DecodeMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.ttft = Histogram(
            "kvmesh_decode_ttft_seconds",
            "Request in to first token out",
            registry=r,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16),
        )
        self.itl = Histogram(
            "kvmesh_decode_inter_token_seconds",
            "Decode step time (each sequence's inter-token latency)",
            registry=r,
            buckets=(0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64),
        )
        self.batch_size = Histogram(
            "kvmesh_decode_batch_size", "Sequences per decode step", registry=r, buckets=(1, 2, 4, 8, 16, 32, 64)
        )
        self.kv_bytes = Counter("kvmesh_kv_bytes_received", "KV bytes received from prefill nodes", registry=r)
        self.faults = Counter(
            "kvmesh_decode_faults", "Unexpected errors in the decode loop (node set NOT_SERVING)", ["error"], registry=r
        )
        self.transfer = Histogram(
            "kvmesh_kv_transfer_seconds",
            "First token to whole KV received",
            registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2),
        )
        self.written_back = Counter(
            "kvmesh_decode_written_back_tokens",
            "Tokens of sequences' KV sent back to a prefix store as blocks fill, by outcome (stored, dropped, failed)",
            ["outcome"],
            registry=r,
        )
        self.replayed = Counter(
            "kvmesh_decode_replayed_tokens",
            "Migrated sequences' output run again through decode steps (what the store did not hold)",
            registry=r,
        )
        self.running = Gauge("kvmesh_decode_running_sequences", "Sequences in the batch", registry=r)
        self.waiting = Gauge("kvmesh_decode_waiting", "Admitted requests not yet in the batch", registry=r)

    def on_step(self, batch_size: int, seconds: float) -> None:
        self.batch_size.observe(batch_size)
        self.itl.observe(seconds)
        self.running.set(batch_size)
