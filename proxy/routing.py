"""Routing policies: which prefill node serves a request. Plain objects over a snapshot of the
cluster (no gRPC here), so the proxy and a simulator use the very same code.

Load bound (consistent hashing with bounded loads): a node may take a request only while its
in-flight requests + 1 <= ceil(c * (all in-flight + 1) / healthy nodes), c = 1.25 by default.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

POLICIES = ("cache_aware", "session_hash", "least_loaded", "round_robin", "random")


@dataclass
class NodeState:
    node_id: str
    healthy: bool = True
    blocks: set[bytes] = field(default_factory=set)  # cached block keys, from WatchCache
    inflight: int = 0  # requests routed here and not finished
    claimed_tokens: int = 0  # prefill tokens our own routing sent here and not yet computed
    reported_tokens: int = 0  # the node's last load report (every router's requests); 0 when unknown
    changed_at: float = 0.0  # when our own routing last changed claimed_tokens (older reports are stale)

    @property
    def queued_tokens(self) -> int:
        """Work waiting there: a report counts our own requests too, so the larger of the two, not the sum."""
        return max(self.claimed_tokens, self.reported_tokens)


@dataclass(frozen=True)
class Request:
    session_id: str
    block_keys: Sequence[bytes]  # the prompt's full blocks, in order
    prompt_tokens: int
    block_size: int


@dataclass(frozen=True)
class Decision:
    node_id: str
    reason: str  # cached_prefix | session_affinity | load_overflow | cold | least_loaded | round_robin | random
    cached_tokens: int  # what the chosen node is expected to reuse


class Policy(Protocol):
    name: str

    def choose(self, nodes: Sequence[NodeState], request: Request) -> Decision: ...


def rendezvous_order(session_id: str, node_ids: Sequence[str]) -> list[str]:
    """The session's preference list: nodes by descending hash(session, node). Removing a node
    moves only the sessions whose first choice it was."""

    def score(node: str) -> bytes:
        return hashlib.blake2b(f"{session_id}\0{node}".encode(), digest_size=8).digest()

    return sorted(node_ids, key=score, reverse=True)


def cached_tokens(node: NodeState, request: Request) -> int:
    """Tokens the node would reuse: its longest run of leading blocks, one token short of the
    whole prompt (the last prompt token is always computed)."""
    n = 0
    for key in request.block_keys:
        if key not in node.blocks:
            break
        n += 1
    return min(n * request.block_size, request.prompt_tokens - 1)


def within_bound(nodes: Sequence[NodeState], c: float) -> list[NodeState]:
    total = sum(n.inflight for n in nodes)
    cap = math.ceil(c * (total + 1) / len(nodes))
    return [n for n in nodes if n.inflight + 1 <= cap]


def _healthy(nodes: Sequence[NodeState]) -> list[NodeState]:
    healthy = [n for n in nodes if n.healthy]
    if not healthy:
        raise LookupError("no healthy node")
    return healthy


class RandomPolicy:
    name = "random"

    def __init__(self, seed: int | None = None) -> None:
        self._rng = random.Random(seed)

    def choose(self, nodes: Sequence[NodeState], request: Request) -> Decision:
        node = self._rng.choice(_healthy(nodes))
        return Decision(node.node_id, "random", cached_tokens(node, request))


class RoundRobinPolicy:
    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    def choose(self, nodes: Sequence[NodeState], request: Request) -> Decision:
        healthy = _healthy(nodes)
        node = healthy[self._next % len(healthy)]
        self._next += 1
        return Decision(node.node_id, "round_robin", cached_tokens(node, request))


class LeastLoadedPolicy:
    name = "least_loaded"

    def choose(self, nodes: Sequence[NodeState], request: Request) -> Decision:
        node = min(_healthy(nodes), key=lambda n: (n.inflight, n.queued_tokens))
        return Decision(node.node_id, "least_loaded", cached_tokens(node, request))


class SessionHashPolicy:
    """The session's rendezvous order, skipping nodes above the load bound."""

    name = "session_hash"

    def __init__(self, c: float = 1.25) -> None:
        self.c = c

    def choose(self, nodes: Sequence[NodeState], request: Request) -> Decision:
        healthy = _healthy(nodes)
        by_id = {n.node_id: n for n in healthy}
        order = rendezvous_order(request.session_id, list(by_id))
        allowed = {n.node_id for n in within_bound(healthy, self.c)}
        node = by_id[next(i for i in order if i in allowed)]
        reason = "session_affinity" if node.node_id == order[0] else "load_overflow"
        return Decision(node.node_id, reason, cached_tokens(node, request))


class CacheAwarePolicy:
    """Least estimated time to first token: uncached prompt tokens on that node + tokens queued
    there, among nodes within the load bound; ties by the session's rendezvous order."""

    name = "cache_aware"

    def __init__(self, c: float = 1.25) -> None:
        self.c = c

    def choose(self, nodes: Sequence[NodeState], request: Request) -> Decision:
        healthy = _healthy(nodes)
        rank = {
            node_id: i for i, node_id in enumerate(rendezvous_order(request.session_id, [n.node_id for n in healthy]))
        }
        allowed = within_bound(healthy, self.c)
        cached = {n.node_id: cached_tokens(n, request) for n in healthy}

        def work(n: NodeState) -> tuple[int, int]:
            return (request.prompt_tokens - cached[n.node_id] + n.queued_tokens, rank[n.node_id])

        node = min(allowed, key=work)
        best_anywhere = max(cached.values())
        if cached[node.node_id] < best_anywhere and all(cached[n.node_id] < best_anywhere for n in allowed):
            reason = "load_overflow"  # the node holding the most of the prompt is over the bound
        elif cached[node.node_id] > 0:
            reason = "cached_prefix"
        else:
            reason = "session_affinity" if rank[node.node_id] == 0 else "cold"
        return Decision(node.node_id, reason, cached[node.node_id])


def make_policy(name: str, c: float = 1.25, seed: int | None = None) -> Policy:
    if name == "cache_aware":
        return CacheAwarePolicy(c)
    if name == "session_hash":
        return SessionHashPolicy(c)
    if name == "least_loaded":
        return LeastLoadedPolicy()
    if name == "round_robin":
        return RoundRobinPolicy()
    if name == "random":
        return RandomPolicy(seed)
    raise ValueError(f"routing policy must be one of {', '.join(POLICIES)}, not {name!r}")
