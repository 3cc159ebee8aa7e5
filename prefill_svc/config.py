"""The prefill node's settings: flags `kvmesh prefill --...`, env KVMESH_PREFILL_*."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from kv_transfer.codec import CHUNK_BYTES
from kvmesh.errors import InvalidArgument
from kvmesh.settings import check_ports, doc


@dataclass(frozen=True)
class PrefillConfig:
    model: Path | None = field(default=None, metadata=doc("model folder (default: the prepared SmolLM2 int4)"))
    store: Path | None = field(default=None, metadata=doc("prefix store folder (default: $KVMESH_HOME/prefix-store)"))
    store_budget_bytes: int = field(default=2 << 30, metadata=doc("stored KV kept under this many bytes (LRU)"))
    block_size: int = field(default=16, metadata=doc("tokens per cached block"))
    prefix_cache: bool = field(
        default=True, metadata=doc("reuse and store prompt prefixes (off: every prompt computed whole, the baseline)")
    )
    host: str = field(default="127.0.0.1", metadata=doc("address to listen on"))
    port: int = field(default=50061, metadata=doc("gRPC port (0: any free port, printed at start)"))
    node_id: str = field(default="", metadata=doc("name in cache events and load reports (default host:port)"))
    threads: int = field(default=2, metadata=doc("ONNX Runtime intra-op threads"))
    provider: str = field(default="auto", metadata=doc("execution provider: auto, cpu, cuda"))
    metrics_port: int = field(default=-1, metadata=doc("Prometheus port (-1: none, 0: any free port)"))
    chunk_bytes: int = field(default=CHUNK_BYTES, metadata=doc("bytes per KV chunk on the wire"))
    max_queued_tokens: int = field(
        default=32768, metadata=doc("prompt tokens to compute admitted at once; beyond: RESOURCE_EXHAUSTED")
    )
    pin_system: tuple[str, ...] = field(default=(), metadata=doc("system prompt to prefill at start and keep"))
    cluster_token: str = field(
        default="",
        metadata=doc(
            "the cluster's shared secret: required on internal calls, sent on ours, keys the tenants' cache salts "
            "(set it in the environment, not on the command line; empty: internal services are open)"
        ),
    )
    drain_seconds: float = field(default=10.0, metadata=doc("on SIGTERM, how long running calls may finish"))
    # Off by default. Measured with bench/peer.py on 2 cores (docs/results/2026-12-03/cpu-2core-amd,
    # chunks of 64 against 0 in the same session, prompts now prefilled into the slot): 8 cold
    # 512-token prompts at once reached their first tokens sooner (6.2 s p50 against 8.4) and the
    # warm batch's TTFT ratio to llama-server went from 0.37 to 0.53, but the warm 8-stream gaps
    # were the same (p99 ratio 1.02 against 1.03) and one stream decoded slower in both pairs of
    # runs (0.91 / 0.79 of the peer against 0.94 / 0.88): not a clear win. A prefill node has no
    # decode steps to take turns with.
    prefill_chunk_tokens: int = field(
        default=0,
        metadata=doc("colocated worker: prompt tokens per prefill chunk, each between two decode steps (0: no turns)"),
    )
    # Measured with bench/peer.py on 2 cores (docs/results/2026-12-04/cpu-2core-amd, second
    # session): 8 warm joins computed their last tokens one after another, each run paying the
    # exact MatMulNBits' fixed cost (~55 ms for 2+ rows); 7 of them together took one run of
    # 121-164 ms, in its turn between decode steps. The 8-stream p99 gap went from 0.83 of
    # llama-server's to 1.06, the warm TTFT from 0.47 to 0.60. Bounded in tokens: a prompt that
    # joins a run waits for the others' tokens too (~2 ms each). Costs ~100 MB resident (the
    # group graph's session). A prefill node runs its prompts together the same way, out of place.
    prefill_together_tokens: int = field(
        default=256,
        metadata=doc(
            "prompts waiting at once are prefilled in one model run while their uncached tokens sum "
            "to at most this (0: each alone)"
        ),
    )
    reply_kv: str = field(
        default="decoded",
        metadata=doc(
            "a written-back reply's KV for the next turn: decoded (the decode steps' own KV, int8 "
            "activations, reused as is; a reply can differ from an uncached run's) or exact (recomputed "
            "here 1 s after the reply ends, between prompts; a turn that comes first computes it)"
        ),
    )

    def __post_init__(self) -> None:
        check_ports(self)
        if (
            self.block_size < 1
            or self.chunk_bytes < 1024
            or self.chunk_bytes % 4
            or self.max_queued_tokens < 1
            or self.prefill_chunk_tokens < 0
            or self.prefill_together_tokens < 0
        ):
            raise InvalidArgument(
                "block_size and max_queued_tokens must be positive, prefill_chunk_tokens and "
                "prefill_together_tokens >= 0, "
                "chunk_bytes a multiple of 4 and >= 1024"
            )
        if self.provider not in ("auto", "cpu", "cuda"):
            raise InvalidArgument(f"provider must be auto, cpu or cuda, not {self.provider!r}")
        if self.reply_kv not in ("exact", "decoded"):
            raise InvalidArgument(f"reply_kv must be exact or decoded, not {self.reply_kv!r}")
        if self.pin_system and not self.prefix_cache:
            raise InvalidArgument("pin_system needs the prefix cache")
