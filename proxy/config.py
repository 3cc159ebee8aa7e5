"""The proxy's settings: flags `kvmesh proxy --...`, env KVMESH_PROXY_*."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from kvmesh.errors import InvalidArgument
from kvmesh.settings import doc
from proxy.routing import POLICIES


@dataclass(frozen=True)
class ProxyConfig:
    model: Path | None = field(default=None, metadata=doc("model folder: tokenizer, chat template, fingerprint"))
    host: str = field(default="127.0.0.1", metadata=doc("address to listen on"))
    port: int = field(default=50051, metadata=doc("gRPC port (0: any free port, printed at start)"))
    prefill: tuple[str, ...] = field(default=(), metadata=doc("a prefill node's host:port"))
    decode: tuple[str, ...] = field(default=(), metadata=doc("a decode node's host:port"))
    worker: tuple[str, ...] = field(
        default=(), metadata=doc("a colocated worker's host:port (prefill and decode in one: no KV transfer)")
    )
    policy: str = field(default="cache_aware", metadata=doc(f"routing policy: {', '.join(POLICIES)}"))
    load_bound: float = field(default=1.25, metadata=doc("a node above this x the mean load is skipped"))
    api_keys: tuple[str, ...] = field(default=(), metadata=doc("KEY=TENANT; none: the proxy is open"))
    block_size: int = field(default=16, metadata=doc("prefill nodes' block size until they report theirs"))
    metrics_port: int = field(default=-1, metadata=doc("Prometheus port (-1: none, 0: any free port)"))
    drain_seconds: float = field(default=30.0, metadata=doc("on SIGTERM, how long running calls may finish"))

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise InvalidArgument(f"routing policy must be one of {', '.join(POLICIES)}, not {self.policy!r}")
        if self.load_bound <= 1.0:
            raise InvalidArgument("load_bound must be > 1")
        if any("=" not in k for k in self.api_keys):
            raise InvalidArgument("api keys are KEY=TENANT")

    def tenants(self) -> dict[str, str]:
        return dict(k.split("=", 1) for k in self.api_keys)
