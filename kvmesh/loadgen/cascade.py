"""The cost cascade: the same workload on four local clusters, each started fresh (empty stores)
and stopped before the next:

  naive           colocated workers, no prefix cache, random routing
  prefix_cache    + each worker's prefix store
  cache_aware     + cache-aware sticky routing
  disaggregated   + prefill and decode pools (KV over gRPC)
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from kvmesh import cluster
from kvmesh.loadgen.driver import run
from kvmesh.loadgen.summary import Summary, summarize
from kvmesh.loadgen.workload import Workload
from kvmesh.settings import doc

CONFIGS = ("naive", "prefix_cache", "cache_aware", "disaggregated")


@dataclass(frozen=True)
class Fleet:
    """The processes every configuration gets: `workers` colocated ones, or `prefill` + `decode`
    nodes when disaggregated."""

    workers: int = field(default=2, metadata=doc("colocated workers (naive, prefix_cache, cache_aware)"))
    prefill: int = field(default=2, metadata=doc("prefill nodes (disaggregated)"))
    decode: int = field(default=2, metadata=doc("decode nodes (disaggregated)"))
    threads: int = field(default=1, metadata=doc("ONNX Runtime threads per process"))
    model: str | None = field(default=None, metadata=doc("model folder (default: the prepared SmolLM2 int4)"))
    port: int = field(default=50551, metadata=doc("the bench clusters' proxy port; nodes take the next ones"))


def cluster_spec(config: str, fleet: Fleet) -> cluster.ClusterSpec:
    base = cluster.ClusterSpec(
        prefill=0, decode=0, workers=fleet.workers, port=fleet.port, model=fleet.model, threads=fleet.threads
    )
    if config == "naive":
        return replace(base, policy="random", prefix_cache=False)
    if config == "prefix_cache":
        return replace(base, policy="random")
    if config == "cache_aware":
        return base
    if config == "disaggregated":
        return replace(base, workers=0, prefill=fleet.prefill, decode=fleet.decode)
    raise ValueError(f"configuration must be one of {', '.join(CONFIGS)}, not {config!r}")


def run_config(config: str, fleet: Fleet, workload: Workload, home: Path, progress: bool = True) -> Summary:
    """Start the configuration's cluster under `home` (its own stores), run the workload, stop it."""
    saved = os.environ.get("KVMESH_HOME")
    os.environ["KVMESH_HOME"] = str(home)
    try:
        procs = cluster.up(cluster_spec(config, fleet))
        try:
            results = asyncio.run(run(procs[-1].address, workload, config, progress))
        finally:
            cluster.down(30)
    finally:
        if saved is None:
            os.environ.pop("KVMESH_HOME", None)
        else:
            os.environ["KVMESH_HOME"] = saved
    nodes = [p.address for p in procs if p.kind in ("prefill", "worker")]
    return summarize(config, results, nodes)


def run_cascade(
    workload: Workload,
    fleet: Fleet,
    configs: tuple[str, ...] = CONFIGS,
    on_done: Callable[[Summary], None] = lambda _: None,
    progress: bool = True,
) -> list[Summary]:
    summaries = []
    with tempfile.TemporaryDirectory(prefix="kvmesh-bench-") as tmp:
        for config in configs:
            summary = run_config(config, fleet, workload, Path(tmp) / config, progress)
            on_done(summary)
            summaries.append(summary)
    return summaries


def run_endpoint(endpoint: str, workload: Workload, label: str = "endpoint", progress: bool = True) -> Summary:
    """The workload against a running endpoint (its nodes as the requests report them)."""
    results = asyncio.run(run(endpoint, workload, label, progress))
    return summarize(label, results, sorted({r.prefill_node for r in results if r.prefill_node}))
