"""The proxy's settings: flags `kvmesh proxy --...`, env KVMESH_PROXY_*."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from kvmesh.errors import InvalidArgument
from kvmesh.settings import check_port, check_ports, doc
from proxy.routing import POLICIES
from proxy.tenants import Limits, Tenant, parse


@dataclass(frozen=True)
class ProxyConfig:
    model: Path | None = field(default=None, metadata=doc("model folder: tokenizer, chat template, fingerprint"))
    host: str = field(default="127.0.0.1", metadata=doc("address to listen on"))
    port: int = field(default=50051, metadata=doc("gRPC port (0: any free port, printed at start)"))
    http_port: int = field(default=8000, metadata=doc("the OpenAI-compatible HTTP API's port (0: off)"))
    model_id: str = field(
        default="", metadata=doc("the model's name in the OpenAI API (default: the model folder's, less its precision)")
    )
    prefill: tuple[str, ...] = field(default=(), metadata=doc("a prefill node's host:port"))
    decode: tuple[str, ...] = field(default=(), metadata=doc("a decode node's host:port"))
    worker: tuple[str, ...] = field(
        default=(), metadata=doc("a colocated worker's host:port (prefill and decode in one: no KV transfer)")
    )
    policy: str = field(default="cache_aware", metadata=doc(f"routing policy: {', '.join(POLICIES)}"))
    load_bound: float = field(default=1.25, metadata=doc("a node above this x the mean load is skipped"))
    api_keys: tuple[str, ...] = field(
        default=(), metadata=doc("KEY=TENANT [streams=N] [tokens=N]; none (and no keys file): the proxy is open")
    )
    api_keys_file: Path | None = field(
        default=None,
        metadata=doc(
            "a file of KEY=TENANT [streams=N] [tokens=N] lines (# comments), e.g. a mounted secret: keys off the "
            "command line"
        ),
    )
    tenant_streams: int = field(
        default=64, metadata=doc("calls a tenant may have running at once, unless its keys line says (streams=N)")
    )
    tenant_tokens: int = field(
        default=1 << 20, metadata=doc("prompt + max_tokens a tenant's running calls may hold (tokens=N on its line)")
    )
    block_size: int = field(default=16, metadata=doc("prefill nodes' block size until they report theirs"))
    metrics_port: int = field(default=-1, metadata=doc("Prometheus port (-1: none, 0: any free port)"))
    cluster_token: str = field(
        default="",
        metadata=doc(
            "the cluster's shared secret: required on internal calls, sent on ours, keys the tenants' cache salts "
            "(set it in the environment, not on the command line; empty: internal services are open)"
        ),
    )
    write_back: bool = field(
        default=True,
        metadata=doc(
            "decode nodes send each finished sequence's new full blocks (reply included) back to the prefill "
            "node's store, so a conversation's next turn computes only its new tokens"
        ),
    )
    sessions_kept: int = field(
        default=4096,
        metadata=doc("sessions whose last turn's token ids are kept, so the next turn reuses the generated ids"),
    )
    drain_seconds: float = field(default=30.0, metadata=doc("on SIGTERM, how long running calls may finish"))
    stall_timeout_s: float = field(
        default=5.0,
        metadata=doc(
            "a node that sends nothing for this long (the first token: plus 5 ms per token to compute) is taken "
            "as frozen: before the first token the request is retried elsewhere, after it migrated"
        ),
    )
    migration_limit: int = field(
        default=3,
        metadata=doc(
            "times one request's stream may move to another node after tokens reached the client (0: never; "
            "the call then ends UNAVAILABLE)"
        ),
    )
    migration_max_tokens: int = field(
        default=0,
        metadata=doc("a stream whose prompt + tokens sent are more is not migrated (0: any that fits the context)"),
    )

    def __post_init__(self) -> None:
        check_ports(self)
        check_port("http_port", self.http_port)
        if self.policy not in POLICIES:
            raise InvalidArgument(f"routing policy must be one of {', '.join(POLICIES)}, not {self.policy!r}")
        if self.load_bound <= 1.0:
            raise InvalidArgument("load_bound must be > 1")
        if self.stall_timeout_s <= 0:
            raise InvalidArgument("stall_timeout_s must be > 0")
        if self.migration_limit < 0 or self.migration_max_tokens < 0:
            raise InvalidArgument("migration_limit and migration_max_tokens must be >= 0")
        if self.tenant_streams < 1 or self.tenant_tokens < 1:
            raise InvalidArgument("tenant_streams and tenant_tokens must be >= 1")

    def tenants(self) -> dict[str, Tenant]:
        """API key -> tenant, from --api-keys and the keys file (read now), every key checked here:
        the proxy calls it before it serves."""
        keys = list(self.api_keys)
        if self.api_keys_file is not None:
            try:
                text = self.api_keys_file.read_text()
            except OSError as e:
                raise InvalidArgument(f"cannot read the API keys file {self.api_keys_file}: {e.strerror}") from e
            lines = [line.strip() for line in text.splitlines()]
            listed = [line for line in lines if line and not line.startswith("#")]
            if not listed:  # an empty secret must not open the proxy
                raise InvalidArgument(f"the API keys file {self.api_keys_file} lists no key")
            keys += listed
        return parse(keys, Limits(self.tenant_streams, self.tenant_tokens), self.cluster_token)
