"""`kvmesh simulate`: the routing policies on a simulated fleet, against naive (random routing, no
prefix cache) and an unbounded sticky policy (rendezvous hashing with no load bound); costs
calibrated from a `kvmesh bench` result; the nodes each needs to meet a time-to-first-token target."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from kvmesh.sim.fleet import Costs, Fleet, Scenario, Tally, balanced_rate
from proxy.routing import CacheAwarePolicy, Policy, RandomPolicy, SessionHashPolicy

# name -> (policy maker, prefix cache on)
POLICIES: dict[str, tuple[Callable[[float, int], Policy], bool]] = {
    "cache_aware": (lambda c, seed: CacheAwarePolicy(c), True),
    "session_hash": (lambda c, seed: SessionHashPolicy(c), True),
    "sticky_unbounded": (lambda c, seed: SessionHashPolicy(float("inf")), True),
    "naive": (lambda c, seed: RandomPolicy(seed), False),
}
WARMUP = 0.2  # the first share of requests (stores still filling) is left out of latency figures


@dataclass(frozen=True)
class Outcome:
    policy: str
    nodes: int
    sessions: int
    requests: int
    cached_ratio: float
    load_imbalance: float  # max / mean of requests per node, over the nodes there from start to end
    ttft_p50_ms: float
    ttft_p99_ms: float
    moved_by_failure: float  # share of the sessions in progress whose next turn the failure sends elsewhere
    moved_by_addition: float
    moved_per_turn: float  # share of later turns on another node than the turn before (all causes)
    wall_s: float


def costs_from_bench(path: Path) -> Costs:
    """Per-token costs measured by `kvmesh bench`: prefill from naive (every token computed),
    decode from the cache-aware configuration."""
    configs = {c["config"]: c for c in json.loads(path.read_text())["configs"]}
    prefill = configs.get("naive", next(iter(configs.values())))["prefill_ms_per_token"]
    decode = configs.get("cache_aware", next(iter(configs.values())))["decode_ms_per_token"]
    return Costs(prefill_ms_per_token=float(prefill), decode_ms_per_token=float(decode))


def run_policy(name: str, scenario: Scenario, costs: Costs, load_bound: float = 1.25) -> Outcome:
    make, cache = POLICIES[name]
    # every policy faces the traffic a fleet serving from its caches is sized for
    sc = replace(scenario, cache=cache, rate=scenario.rate or balanced_rate(scenario, costs))
    start = time.perf_counter()
    fleet = Fleet(sc, costs, make(load_bound, sc.seed))
    tally = fleet.run()
    steady = [n.requests for n in fleet.nodes[: sc.nodes] if n.state.healthy]
    return _outcome(name, sc, tally, steady, time.perf_counter() - start)


def _outcome(name: str, sc: Scenario, t: Tally, per_node: list[int], wall_s: float) -> Outcome:
    ttft = t.ttft_ms[int(len(t.ttft_ms) * WARMUP) :]
    return Outcome(
        policy=name,
        nodes=sc.nodes,
        sessions=sc.sessions,
        requests=t.requests,
        cached_ratio=t.cached_tokens / t.prompt_tokens if t.prompt_tokens else 0.0,
        load_imbalance=max(per_node) / float(np.mean(per_node)) if per_node else 1.0,
        ttft_p50_ms=float(np.percentile(ttft, 50)) if ttft else float("nan"),
        ttft_p99_ms=float(np.percentile(ttft, 99)) if ttft else float("nan"),
        moved_by_failure=t.moved_by_failure / t.asked_at_failure if t.asked_at_failure else 0.0,
        moved_by_addition=t.moved_by_addition / t.asked_at_addition if t.asked_at_addition else 0.0,
        moved_per_turn=t.moved_per_turn / t.later_turns if t.later_turns else 0.0,
        wall_s=wall_s,
    )


def nodes_needed(
    name: str, scenario: Scenario, costs: Costs, target_ms: float, percentile: int, rate: float, limit: int
) -> int:
    """The fewest nodes whose TTFT p50 or p99 (`percentile`) stays within the target at `rate`
    sessions/s (doubling, then bisection; no failures or additions); -1 when not even `limit` do."""
    base = replace(scenario, rate=rate, fail_at=-1, add_at=-1)

    def meets(n: int) -> bool:
        outcome = run_policy(name, replace(base, nodes=n), costs)
        return (outcome.ttft_p50_ms if percentile == 50 else outcome.ttft_p99_ms) <= target_ms

    low, high = 0, 1
    while not meets(high):
        if high >= limit:
            return -1
        low, high = high, min(high * 2, limit)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if meets(mid) else (mid, high)
    return high


ROWS = (
    ("cached-token ratio", "cached_ratio", "{:.3f}"),
    ("load imbalance max/mean", "load_imbalance", "{:.3f}"),
    ("TTFT p50 ms", "ttft_p50_ms", "{:.0f}"),
    ("TTFT p99 ms", "ttft_p99_ms", "{:.0f}"),
    ("moved by the failure", "moved_by_failure", "{:.2%}"),
    ("moved by the addition", "moved_by_addition", "{:.2%}"),
    ("moved per later turn", "moved_per_turn", "{:.2%}"),
    ("simulation wall s", "wall_s", "{:.0f}"),
)


def table(outcomes: list[Outcome], needed: dict[str, dict[str, int]]) -> str:
    width = max(16, *(len(o.policy) + 2 for o in outcomes))
    lines = [f"{'metric':26}" + "".join(f"{o.policy:>{width}}" for o in outcomes)]
    for label, attr, fmt in ROWS:
        lines.append(f"{label:26}" + "".join(f"{fmt.format(getattr(o, attr)):>{width}}" for o in outcomes))
    for target, by_policy in needed.items():
        cells = [_nodes(by_policy.get(o.policy)) for o in outcomes]
        lines.append(f"{'nodes for ' + target:26}" + "".join(f"{c:>{width}}" for c in cells))
    return "\n".join(lines)


def _nodes(n: int | None) -> str:
    return "" if n is None else "not met" if n < 0 else str(n)


def to_json(
    scenario: Scenario, costs: Costs, outcomes: list[Outcome], needed: dict[str, dict[str, int]]
) -> dict[str, Any]:
    return {
        "scenario": asdict(scenario),
        "costs": asdict(costs),
        "outcomes": [asdict(o) for o in outcomes],
        "nodes_needed": needed,
    }
