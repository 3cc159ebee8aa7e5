"""The cascade's table (ratios against naive, measured in the same run), JSON, PNG plots and a
markdown report that embeds them."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import numpy as np

from kvmesh.loadgen.summary import Summary
from kvmesh.loadgen.workload import WorkloadSpec

# (label, attribute, format, better when higher)
ROWS = (
    ("requests (errors)", None, "", True),
    ("prefill tokens computed", "computed_tokens", "{:.0f}", False),
    ("computed / prompt tokens", "computed_ratio", "{:.3f}", False),
    ("cached-token ratio", "cached_ratio", "{:.3f}", True),
    ("TTFT p50 ms", "ttft_p50_ms", "{:.0f}", False),
    ("TTFT p99 ms", "ttft_p99_ms", "{:.0f}", False),
    ("ITL p50 ms", "itl_p50_ms", "{:.1f}", False),
    ("ITL p99 ms", "itl_p99_ms", "{:.1f}", False),
    ("requests/s", "requests_per_s", "{:.3f}", True),
    ("output tokens/s", "output_tokens_per_s", "{:.1f}", True),
    ("load imbalance max/mean", "load_imbalance", "{:.2f}", False),
)


def ratio_vs_naive(s: Summary, naive: Summary, attr: str, higher_better: bool) -> float:
    """> 1: better than naive (a time or a cost divided into naive's; a rate divided by naive's)."""
    a, b = float(getattr(s, attr)), float(getattr(naive, attr))
    if higher_better:
        return a / b if b else float("nan")
    return b / a if a else float("nan")


def table(summaries: Sequence[Summary]) -> str:
    naive = summaries[0]
    names = [s.config for s in summaries]
    width = max(14, *(len(n) + 2 for n in names))
    lines = [f"{'metric':28}" + "".join(f"{n:>{width}}" for n in names)]
    for label, attr, fmt, higher in ROWS:
        if attr is None:
            cells = [f"{s.requests} ({s.errors})" for s in summaries]
        else:
            cells = [fmt.format(getattr(s, attr)) for s in summaries]
        lines.append(f"{label:28}" + "".join(f"{c:>{width}}" for c in cells))
        if attr in ("computed_tokens", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "output_tokens_per_s"):
            ratios = [ratio_vs_naive(s, naive, attr, higher) for s in summaries]
            lines.append(f"{'  x naive (> 1: better)':28}" + "".join(f"{r:>{width}.2f}" for r in ratios))
    return "\n".join(lines)


def to_json(spec: WorkloadSpec, fleet: dict[str, Any], summaries: Sequence[Summary]) -> dict[str, Any]:
    naive = summaries[0]
    return {
        "workload": asdict(spec),
        "fleet": fleet,
        "configs": [
            {
                **{k: v for k, v in asdict(s).items() if k != "ttft_ms"},
                "computed_ratio": s.computed_ratio,
                "cached_ratio": s.cached_ratio,
                "computed_vs_naive": s.computed_tokens / naive.computed_tokens if naive.computed_tokens else None,
                "ttft_p50_x_naive": ratio_vs_naive(s, naive, "ttft_p50_ms", False),
                "ttft_ms": s.ttft_ms,
            }
            for s in summaries
        ],
    }


def plots(summaries: Sequence[Summary], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "ttft_cdf.png", out / "prefill_cascade.png", out / "node_load.png"]

    fig, ax = plt.subplots(figsize=(7, 4))
    for s in summaries:
        xs = np.sort(s.ttft_ms)
        ax.step(xs, np.arange(1, len(xs) + 1) / max(len(xs), 1), where="post", label=s.config)
    ax.set(xscale="log", xlabel="time to first token (ms, log)", ylabel="fraction of requests", title="TTFT CDF")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    naive = summaries[0].computed_tokens or 1
    bars = ax.bar([s.config for s in summaries], [s.computed_tokens for s in summaries], color="tab:blue")
    for bar, s in zip(bars, summaries, strict=True):
        ax.annotate(
            f"{s.computed_tokens / naive:.0%}",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
        )
    ax.set(ylabel="prefill tokens computed", title="Prefill work, as a share of naive's")
    fig.tight_layout()
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(summaries)
    for i, s in enumerate(summaries):
        counts = list(s.node_requests.values())
        ax.bar(np.arange(len(counts)) + i * width, counts, width, label=f"{s.config} (max/mean {s.load_imbalance:.2f})")
    nodes = len(summaries[0].node_requests)
    ax.set_xticks(np.arange(nodes) + width * (len(summaries) - 1) / 2, [f"node {i}" for i in range(nodes)])
    ax.set(ylabel="requests", title="Requests per prefill-capable node")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(paths[2], dpi=110)
    plt.close(fig)
    return paths


def markdown(spec: WorkloadSpec, fleet: dict[str, Any], summaries: Sequence[Summary], images: Sequence[Path]) -> str:
    loop = (
        f"closed loop, {spec.concurrency} users at a time"
        if spec.closed_loop
        else f"open loop, Poisson session arrivals at {spec.rate}/s"
    )
    lines = [
        "# kvmesh bench: the cost cascade",
        "",
        f"Workload: {spec.users} users across {spec.apps} apps, system prompts of {spec.system_tokens} tokens, "
        f"{spec.turns} turns per session, user messages ~{spec.user_tokens} tokens, replies of up to {spec.max_tokens} "
        f"tokens, think time ~{spec.think_s} s (exponential), {loop}, seed {spec.seed}.",
        f"Fleet: {json.dumps(fleet)}. Each configuration ran on a fresh cluster with empty stores.",
        "",
        "```",
        table(summaries),
        "```",
        "",
    ]
    lines += [f"![{p.stem}]({p.name})" for p in images]
    return "\n".join(lines) + "\n"


def write(spec: WorkloadSpec, fleet: dict[str, Any], summaries: Sequence[Summary], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    images = plots(summaries, out)
    (out / "bench.json").write_text(json.dumps(to_json(spec, fleet, summaries), indent=2))
    (out / "report.md").write_text(markdown(spec, fleet, summaries, images))
    return [out / "bench.json", out / "report.md", *images]
