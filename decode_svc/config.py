"""The decode node's settings: flags `kvmesh decode --...` (or `kvmesh worker`), env KVMESH_DECODE_*."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from kvmesh.errors import InvalidArgument


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class DecodeConfig:
    model: Path | None = field(default=None, metadata=_help("model folder (default: the prepared SmolLM2 int4)"))
    host: str = field(default="127.0.0.1", metadata=_help("address to listen on"))
    port: int = field(default=50071, metadata=_help("gRPC port (0: any free port, printed at start)"))
    node_id: str = field(default="", metadata=_help("name in load reports (default host:port)"))
    threads: int = field(default=2, metadata=_help("ONNX Runtime intra-op threads"))
    provider: str = field(default="auto", metadata=_help("execution provider: auto, cpu, cuda"))
    metrics_port: int = field(default=-1, metadata=_help("Prometheus port (-1: none, 0: any free port)"))
    slots: int = field(default=16, metadata=_help("sequences decoded together at most (the batch)"))
    slot_tokens: int = field(default=2560, metadata=_help("prompt + completion tokens one sequence may hold"))
    max_waiting: int = field(
        default=32, metadata=_help("admitted requests waiting for a slot; beyond: RESOURCE_EXHAUSTED")
    )
    prefill_timeout_s: float = field(default=120.0, metadata=_help("deadline of a KV pull when the call has none"))
    drain_seconds: float = field(default=30.0, metadata=_help("on SIGTERM, how long running sequences may finish"))
    # A colocated worker prefills in this process, with its own prefix store: the baseline that
    # disaggregation is measured against. Its Decode calls ignore prefill_node.
    colocated: bool = field(default=False, metadata=_help("prefill in this process (no KV transfer)"))
    store: Path | None = field(default=None, metadata=_help("colocated: prefix store folder"))
    store_budget_bytes: int = field(default=2 << 30, metadata=_help("colocated: prefix store byte budget"))
    block_size: int = field(default=16, metadata=_help("colocated: tokens per cached block"))

    def __post_init__(self) -> None:
        if self.slots < 1 or self.slot_tokens < 2 or self.max_waiting < 0:
            raise InvalidArgument("slots >= 1, slot_tokens >= 2 and max_waiting >= 0")
        if self.provider not in ("auto", "cpu", "cuda"):
            raise InvalidArgument(f"provider must be auto, cpu or cuda, not {self.provider!r}")
