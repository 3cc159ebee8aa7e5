"""One configuration's figures from its requests' results."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from kvmesh.loadgen.driver import Result


@dataclass(frozen=True)
class Summary:
    config: str
    requests: int
    errors: int
    prompt_tokens: int
    cached_tokens: int
    computed_tokens: int  # prefill tokens the model ran: prompt - cached
    output_tokens: int
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float
    requests_per_s: float
    output_tokens_per_s: float
    load_imbalance: float  # max / mean of requests per prefill node (what the load bound holds)
    prefill_ms_per_token: float  # model time per computed prompt token (calibrates kvmesh simulate)
    decode_ms_per_token: float  # decode time per generated token after the first
    node_computed: dict[str, int] = field(default_factory=dict)  # prefill node -> tokens computed there
    node_requests: dict[str, int] = field(default_factory=dict)
    ttft_ms: list[float] = field(default_factory=list)  # every request's, for the CDF

    @property
    def cached_ratio(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def computed_ratio(self) -> float:
        return self.computed_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


def _pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000 if len(values) else float("nan")


def _per(total: float, count: int) -> float:
    return total / count if count else float("nan")


def summarize(config: str, results: Sequence[Result], nodes: Sequence[str]) -> Summary:
    """`nodes`: every prefill-capable node of the configuration (idle ones count in the imbalance)."""
    ok = [r for r in results if not r.error]
    computed: Counter[str] = Counter({n: 0 for n in nodes})
    requests: Counter[str] = Counter({n: 0 for n in nodes})
    for r in ok:
        computed[r.prefill_node] += r.prompt_tokens - r.cached_tokens
        requests[r.prefill_node] += 1
    ttft = [r.ttft_s for r in ok]
    itl = [gap for r in ok for gap in r.itl_s]
    span = (max(r.done_s for r in ok) - min(r.sent_s for r in ok)) if ok else 0.0
    output = sum(r.completion_tokens for r in ok)
    mean = float(np.mean(list(requests.values()))) if requests else 0.0
    return Summary(
        config=config,
        requests=len(results),
        errors=len(results) - len(ok),
        prompt_tokens=sum(r.prompt_tokens for r in ok),
        cached_tokens=sum(r.cached_tokens for r in ok),
        computed_tokens=sum(r.prompt_tokens - r.cached_tokens for r in ok),
        output_tokens=output,
        ttft_p50_ms=_pct(ttft, 50),
        ttft_p99_ms=_pct(ttft, 99),
        itl_p50_ms=_pct(itl, 50),
        itl_p99_ms=_pct(itl, 99),
        requests_per_s=len(ok) / span if span else 0.0,
        output_tokens_per_s=output / span if span else 0.0,
        load_imbalance=max(requests.values()) / mean if mean else 1.0,
        prefill_ms_per_token=_per(
            sum(r.prefill_compute_ms for r in ok), sum(r.prompt_tokens - r.cached_tokens for r in ok)
        ),
        decode_ms_per_token=_per(sum(r.decode_ms for r in ok), sum(max(r.completion_tokens - 1, 0) for r in ok)),
        node_computed=dict(computed),
        node_requests=dict(requests),
        ttft_ms=[t * 1000 for t in ttft],
    )
