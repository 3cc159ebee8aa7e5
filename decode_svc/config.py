"""The decode node's settings: flags `kvmesh decode --...`, env KVMESH_DECODE_* (a colocated worker's
decode half: `kvmesh worker`, env KVMESH_WORKER_*)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from kvmesh.errors import InvalidArgument
from kvmesh.settings import check_ports, doc


@dataclass(frozen=True)
class DecodeConfig:
    model: Path | None = field(default=None, metadata=doc("model folder (default: the prepared SmolLM2 int4)"))
    host: str = field(default="127.0.0.1", metadata=doc("address to listen on"))
    port: int = field(default=50071, metadata=doc("gRPC port (0: any free port, printed at start)"))
    node_id: str = field(default="", metadata=doc("name in load reports (default host:port)"))
    threads: int = field(default=2, metadata=doc("ONNX Runtime intra-op threads"))
    provider: str = field(default="auto", metadata=doc("execution provider: auto, cpu, cuda"))
    metrics_port: int = field(default=-1, metadata=doc("Prometheus port (-1: none, 0: any free port)"))
    decode_numerics: str = field(
        default="auto",
        metadata=doc(
            "decode steps: int8 (activations, the folder's decode graph), exact (fp32 activations, as prefill), "
            "auto (int8 where the CPU has AVX-512 VNNI, else exact)"
        ),
    )
    slots: int = field(default=16, metadata=doc("sequences decoded together at most (the batch)"))
    slot_tokens: int = field(
        default=0, metadata=doc("prompt + completion tokens one sequence may hold (0: the model's context)")
    )
    # Measured on 2 cores (SmolLM2, 46,080 B of KV a token): a join into fresh memory costs ~33 ms
    # per 1,000 tokens to fault in (MADV_POPULATE_WRITE, ~1.4 GB/s) and stalls every stream
    # meanwhile; 1,024 warm tokens a slot (755 MB at the defaults) cover most chats without one.
    warm_tokens: int = field(
        default=1024, metadata=doc("tokens of KV memory per slot made resident at start (the rest as tokens come)")
    )
    kv_budget_tokens: int = field(
        default=40960,
        metadata=doc(
            "prompt + max_tokens of the admitted requests together (KV memory: x 46,080 B for SmolLM2); "
            "beyond: RESOURCE_EXHAUSTED"
        ),
    )
    max_waiting: int = field(
        default=32, metadata=doc("admitted requests waiting for a slot; beyond: RESOURCE_EXHAUSTED")
    )
    prefill_timeout_s: float = field(default=120.0, metadata=doc("deadline of a KV pull when the call has none"))
    stall_timeout_s: float = field(
        default=5.0,
        metadata=doc("a prefill node silent this long (its header: plus 5 ms per prompt token) is taken as frozen"),
    )
    cluster_token: str = field(
        default="",
        metadata=doc(
            "the cluster's shared secret: required on internal calls, sent on ours, keys the tenants' cache salts "
            "(set it in the environment, not on the command line; empty: internal services are open)"
        ),
    )
    drain_seconds: float = field(default=30.0, metadata=doc("on SIGTERM, how long running sequences may finish"))

    def __post_init__(self) -> None:
        check_ports(self)
        if self.slots < 1 or self.slot_tokens == 1 or self.slot_tokens < 0 or self.max_waiting < 0:
            raise InvalidArgument("slots >= 1, slot_tokens 0 or >= 2 and max_waiting >= 0")
        if self.warm_tokens < 0 or self.kv_budget_tokens < 2:
            raise InvalidArgument("warm_tokens >= 0 and kv_budget_tokens >= 2")
        # the runner's DECODE_NUMERICS, spelled out: flags parse without importing onnxruntime
        if self.decode_numerics not in ("auto", "int8", "exact"):
            raise InvalidArgument(f"decode_numerics must be auto, int8 or exact, not {self.decode_numerics!r}")
        if self.provider not in ("auto", "cpu", "cuda"):
            raise InvalidArgument(f"provider must be auto, cpu or cuda, not {self.provider!r}")
