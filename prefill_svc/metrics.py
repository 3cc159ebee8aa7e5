"""Prometheus metrics of a prefill node, in a registry of its own (or a colocated worker's)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class PrefillMetrics:
    def __init__(
        self,
        store_stats: Callable[[], tuple[int, int, int]],
        queued: Callable[[], int],
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.registry = r = registry or CollectorRegistry()
        self.lookup_tokens = Counter(
            "kvmesh_prefill_lookup_tokens", "Prompt tokens looked up in the prefix store", registry=r
        )
        self.hit_tokens = Counter("kvmesh_prefill_hit_tokens", "Prompt tokens served from the prefix store", registry=r)
        self.latency = Histogram(
            "kvmesh_prefill_seconds",
            "Prefill time, admission to KV ready",
            registry=r,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32),
        )
        self.store_read = Histogram(
            "kvmesh_prefix_store_read_seconds",
            "Reading and checking cached blocks",
            registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
        )
        self.together = Counter(
            "kvmesh_prefill_together",
            "Prompts prefilled in one model run with others",
            registry=r,
        )
        self.kv_bytes_sent = Counter("kvmesh_kv_bytes_sent", "KV bytes streamed to decode nodes", registry=r)
        self.written_back = Counter(
            "kvmesh_prefill_written_back_blocks",
            "Decode nodes' KV blocks (replies) queued for the store",
            registry=r,
        )
        self.recomputed = Counter(
            "kvmesh_prefill_recomputed_blocks",
            "Written-back blocks a decode node made with other numerics, recomputed by this exact prefill",
            registry=r,
        )
        self.evictions = Counter("kvmesh_prefix_store_evictions", "Blocks evicted or dropped", registry=r)
        self.faults = Counter(
            "kvmesh_prefill_faults",
            "Unexpected errors in background threads (node set NOT_SERVING)",
            ["error"],
            registry=r,
        )
        self.checksum_failures = Counter(
            "kvmesh_prefix_store_checksum_failures", "Stored blocks that failed their checksum", registry=r
        )
        Gauge(
            "kvmesh_prefill_queued_tokens",
            "Prompt tokens admitted and not yet computed (stored prefixes excluded)",
            registry=r,
        ).set_function(queued)
        self.pushed_out = Counter(
            "kvmesh_prefill_pushed_out",
            "Queued prefills refused to make room for a tenant holding less than its share of the queue",
            registry=r,
        )
        Gauge("kvmesh_prefix_store_bytes", "KV bytes in the prefix store", registry=r).set_function(
            lambda: store_stats()[0]
        )
        Gauge("kvmesh_prefix_store_blocks", "Blocks in the prefix store", registry=r).set_function(
            lambda: store_stats()[1]
        )
