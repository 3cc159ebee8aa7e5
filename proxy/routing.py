"""Routing policies: which prefill node serves a request. Plain objects over a snapshot of the
cluster (no gRPC here), so the proxy and a simulator use the very same code.

Load bound (consistent hashing with bounded loads): a node may take a request only while its
in-flight requests + 1 <= ceil(c * (all in-flight + 1) / healthy nodes), c = 1.25 by default.
"""

from __future__ import annotations

import functools
import hashlib
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

POLICIES = ("cache_aware", "session_hash", "least_loaded", "round_robin", "random")


@dataclass
class NodeState:
    node_id: str
    healthy: bool = True
    blocks: set[bytes] = field(default_factory=set)  # cached block keys, from WatchCache
    # blocks that requests routed here are computing now (key -> how many): a request with the same
    # new prefix finds them there once those are done, so it should queue behind them, not redo them
    pending: dict[bytes, int] = field(default_factory=dict)
    inflight: int = 0  # requests routed here and not finished
    claimed_tokens: int = 0  # prefill tokens our own routing sent here and not yet computed
    reported_tokens: int = 0  # the node's last load report (every router's requests); 0 when unknown
    changed_at: float = 0.0  # when our own routing last changed claimed_tokens (older reports are stale)
    # the proxy's followers: what the node's health stream says, and its load polls missed in a row
    # (healthy is serving and answering; the simulator sets healthy alone)
    serving: bool = False
    missed_polls: int = 0
    last_token_at: float = 0.0  # a decode node's: when a stream from it last relayed a token (event loop time)

    @property
    def queued_tokens(self) -> int:
        """Work waiting there: a report counts our own requests too, so the larger of the two, not the sum."""
        claimed, reported = self.claimed_tokens, self.reported_tokens
        return claimed if claimed > reported else reported


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


def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


@functools.lru_cache(maxsize=256)
def _node_hashes(node_ids: tuple[str, ...]) -> np.ndarray:
    return np.array([_hash64(n) for n in node_ids], dtype=np.uint64)


def rendezvous_scores(session_id: str, node_ids: Sequence[str]) -> np.ndarray:
    """score(session, node) for each node: the splitmix64 finaliser of hash(session) ^ hash(node),
    one vector operation per step (a fleet of hundreds of nodes costs microseconds, not a hash call
    per node). Each score depends on its own node only, so removing a node reorders nobody else."""
    with np.errstate(over="ignore"):
        x = _node_hashes(tuple(node_ids)) ^ np.uint64(_hash64(session_id))
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


def first_choice(session_id: str, node_ids: Sequence[str]) -> str:
    """The session's preferred node: the highest score. Removing a node moves only the sessions
    whose first choice it was."""
    return node_ids[int(np.argmax(rendezvous_scores(session_id, node_ids)))]


def cached_tokens(node: NodeState, request: Request) -> int:
    """Tokens the node would reuse: its longest run of leading blocks (stored, or being computed
    there for an earlier request), one token short of the whole prompt (the last prompt token is
    always computed)."""
    n = 0
    blocks, pending = node.blocks, node.pending
    for key in request.block_keys:
        if key not in blocks and key not in pending:
            break
        n += 1
    return min(n * request.block_size, request.prompt_tokens - 1)


def within_bound(nodes: Sequence[NodeState], c: float) -> list[NodeState]:
    if math.isinf(c):  # no bound (the unbounded sticky baseline)
        return list(nodes)
    total = sum([n.inflight for n in nodes])
    cap = math.ceil(c * (total + 1) / len(nodes))
    return [n for n in nodes if n.inflight < cap]


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
        # A few draws find a healthy node (uniform over the healthy ones) without a pass over the
        # fleet; a fleet mostly down falls back to the list of the healthy.
        draws = (nodes[self._rng.randrange(len(nodes))] for _ in range(8 if nodes else 0))
        node = next((n for n in draws if n.healthy), None) or self._rng.choice(_healthy(nodes))
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
        allowed = within_bound(healthy, self.c)
        scores = rendezvous_scores(request.session_id, [n.node_id for n in healthy])
        top = int(np.argmax(scores))
        if len(allowed) < len(healthy):  # the best-scoring node within the bound
            within = {id(n) for n in allowed}  # identity: NodeStates compare by value
            ok = np.fromiter((id(n) in within for n in healthy), bool, len(healthy))
            chosen = int(np.argmax(np.where(ok, scores, np.uint64(0))))
        else:
            chosen = top
        node = healthy[chosen]
        reason = "session_affinity" if chosen == top else "load_overflow"
        return Decision(node.node_id, reason, cached_tokens(node, request))


class CacheAwarePolicy:
    """Least cost among nodes within the load bound: the estimated time to first token there
    (tokens queued + the prompt's uncached tokens) plus the compute the request adds to that node
    (its uncached tokens again), so equal waits go where less is recomputed: a session stays on
    its node unless the queue elsewhere is shorter by more than what moving would recompute, and
    a request for a prefix that is being computed queues behind it. Ties by rendezvous order."""

    name = "cache_aware"

    def __init__(self, c: float = 1.25) -> None:
        self.c = c

    def choose(self, nodes: Sequence[NodeState], request: Request) -> Decision:
        healthy = _healthy(nodes)
        allowed = within_bound(healthy, self.c)
        # Only a node holding the first block can reuse anything: the rest cost one set lookup
        # (a fleet of hundreds of nodes is a few passes of plain attribute reads per request).
        first = request.block_keys[0] if request.block_keys else None
        cached = {n.node_id: cached_tokens(n, request) for n in healthy if first in n.blocks or first in n.pending}
        prompt = request.prompt_tokens
        work = [2 * (prompt - cached.get(n.node_id, 0)) + n.queued_tokens for n in allowed]
        least = min(work)
        tied = [n.node_id for n, w in zip(allowed, work, strict=True) if w == least]
        chosen = tied[0] if len(tied) == 1 else first_choice(request.session_id, tied)
        mine, best_anywhere = cached.get(chosen, 0), max(cached.values(), default=0)
        if mine < best_anywhere and all(cached.get(n.node_id, 0) < best_anywhere for n in allowed):
            reason = "load_overflow"  # the node holding the most of the prompt is over the bound
        elif mine > 0:
            reason = "cached_prefix"
        else:  # nothing of the prompt cached there: a new session, or one whose blocks are gone
            reason = "cold"
        return Decision(chosen, reason, mine)


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
