"""A simulated fleet of prefill-capable nodes driven by the proxy's own routing policies.

Discrete events in simulated time. Each node prefills one request at a time, first come first
served (the model thread), in `prefill_ms_per_token` x uncached tokens + `overhead_ms`, then the
request decodes for `decode_ms_per_token` x its reply; it counts as in flight on that node until
then (what the proxy's load bound counts). Each node's prefix store is an LRU of blocks with a
token budget; the router sees it exactly (cache events without delay). Sessions arrive as a
Poisson process, each with `turns` turns separated by think times.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from proxy.routing import NodeState, Policy, Request


@dataclass(frozen=True)
class Costs:
    prefill_ms_per_token: float = 1.9  # int4 SmolLM2, 1 thread, this kind of machine (kvmesh bench)
    decode_ms_per_token: float = 12.0
    overhead_ms: float = 15.0  # per request: store read, KV hand-over, first token


@dataclass(frozen=True)
class Scenario:
    nodes: int = 256
    sessions: int = 1_000_000
    rate: float = 0.0  # sessions per second; 0: the rate that loads the fleet to `utilization`
    utilization: float = 0.45  # of prefill capacity if every turn found its prefix (rate 0: the rate that does it)
    apps: int = 512  # each with its own system prompt; popularity Zipf(app_skew)
    app_skew: float = 1.1
    system_tokens: int = 2000
    turns: int = 3
    user_tokens: int = 50
    reply_tokens: int = 32
    think_s: float = 20.0
    block_tokens: int = 256  # the simulated store's block (coarser than a node's 16: fewer keys to move)
    store_tokens: int = 1_500_000  # per node (~64 GiB of fp32 SmolLM2 KV)
    cache: bool = True  # False: no prefix store anywhere (naive)
    fail_at: float = 0.5  # a node fails when this share of sessions has arrived (< 0: never)
    add_at: float = 0.75  # a node is added then (< 0: never)
    seed: int = 0


@dataclass
class Node:
    state: NodeState
    capacity_blocks: int
    lru: OrderedDict[bytes, None] = field(default_factory=OrderedDict)
    busy_until: float = 0.0  # its prefill queue drains then
    requests: int = 0

    def touch(self, keys: list[bytes]) -> None:
        """The prompt's blocks stored (or reused) after its prefill; least recently used go first."""
        lru, blocks = self.lru, self.state.blocks
        for key in keys:
            if key in lru:
                lru.move_to_end(key)
            else:
                lru[key] = None
                blocks.add(key)
        while len(lru) > self.capacity_blocks:
            blocks.discard(lru.popitem(last=False)[0])

    def fail(self) -> None:
        self.state.healthy = False
        self.lru.clear()
        self.state.blocks.clear()


@dataclass
class Tally:
    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    ttft_ms: list[float] = field(default_factory=list)
    # Sessions in progress at a failure (addition) whose next turn the policy sends elsewhere
    # with the node gone (added) than with it there: the same fleet state, both ways.
    moved_by_failure: int = 0
    asked_at_failure: int = 0
    moved_by_addition: int = 0
    asked_at_addition: int = 0
    moved_per_turn: int = 0  # turns (after the first) that changed node, all causes
    later_turns: int = 0


@dataclass
class Active:
    """A session between turns, as the fleet knows it."""

    app: int
    node_id: str  # where its last turn went
    next_turn: int
    history: int  # its prompt so far: system, earlier turns, replies


@dataclass(frozen=True)
class TurnSent:
    session: int
    app: int
    turn: int
    history: int  # prompt tokens before this turn's user message


@dataclass(frozen=True)
class Prefilled:
    node: Node
    work: int
    keys: list[bytes]


@dataclass(frozen=True)
class Done:
    node: Node
    session: int
    app: int
    turn: int
    prompt: int


Event = TurnSent | Prefilled | Done
MOVE_SAMPLE = 20_000  # sessions asked where they would go, before and after a failure or addition


class Fleet:
    def __init__(self, scenario: Scenario, costs: Costs, policy: Policy) -> None:
        self.sc, self.costs, self.policy = scenario, costs, policy
        self.nodes: list[Node] = []
        self.by_id: dict[str, Node] = {}
        self.states: list[NodeState] = []  # what the policy sees
        for _ in range(scenario.nodes):
            self._new_node()
        self.tally = Tally()
        self._heap: list[tuple[float, int, Event]] = []  # (time s, tie-breaker, event)
        self._seq = 0
        self._app_keys: dict[tuple[int, int], bytes] = {}
        self.users = np.zeros((0, 0), np.int64)  # user message tokens per (session, turn), drawn by run()

    def _new_node(self) -> None:
        node = Node(NodeState(f"node-{len(self.nodes)}"), max(self.sc.store_tokens // self.sc.block_tokens, 1))
        self.nodes.append(node)
        self.states.append(node.state)
        self.by_id[node.state.node_id] = node

    def _push(self, t: float, event: Event) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, event))

    def _keys(self, app: int, session: int, prompt_tokens: int) -> list[bytes]:
        """Block keys of a prompt: the app's system prompt blocks (shared), then the session's."""
        b = self.sc.block_tokens
        shared = self.sc.system_tokens // b
        keys = []
        for j in range(prompt_tokens // b):
            if j < shared:
                key = self._app_keys.get((app, j))
                if key is None:
                    key = self._app_keys[(app, j)] = b"a" + app.to_bytes(4, "little") + j.to_bytes(2, "little")
            else:
                key = b"s" + session.to_bytes(5, "little") + j.to_bytes(2, "little")
            keys.append(key)
        return keys

    def run(self) -> Tally:
        sc, rng = self.sc, np.random.default_rng(self.sc.seed)
        rate = sc.rate or balanced_rate(sc, self.costs)
        starts = np.cumsum(rng.exponential(1 / rate, sc.sessions))
        weights = 1.0 / np.arange(1, sc.apps + 1) ** sc.app_skew
        apps = rng.choice(sc.apps, sc.sessions, p=weights / weights.sum())
        thinks = rng.exponential(sc.think_s, (sc.sessions, max(sc.turns - 1, 1)))
        self.users = rng.integers(sc.user_tokens // 2, sc.user_tokens * 3 // 2 + 1, (sc.sessions, sc.turns))
        fail_t = starts[int(sc.fail_at * (sc.sessions - 1))] if sc.fail_at >= 0 else float("inf")
        add_t = starts[int(sc.add_at * (sc.sessions - 1))] if sc.add_at >= 0 else float("inf")
        active: dict[int, Active] = {}
        next_session = 0
        while next_session < sc.sessions or self._heap:
            if next_session < sc.sessions and (not self._heap or starts[next_session] <= self._heap[0][0]):
                first = TurnSent(next_session, int(apps[next_session]), 0, sc.system_tokens)
                self._push(float(starts[next_session]), first)
                next_session += 1
                continue
            t, _, event = heapq.heappop(self._heap)
            if t >= fail_t:
                self._fail_one(rng, active)
                fail_t = float("inf")
            if t >= add_t:
                self._add_one(active)
                add_t = float("inf")
            if isinstance(event, TurnSent):
                s = event.session
                node_id = self._route(event, event.history + int(self.users[s, event.turn]), t)
                before = active.get(s)
                if before is not None:
                    self.tally.later_turns += 1
                    self.tally.moved_per_turn += before.node_id != node_id
                active[s] = Active(event.app, node_id, event.turn + 1, event.history)
            elif isinstance(event, Prefilled):
                event.node.state.claimed_tokens -= event.work
                if sc.cache and event.node.state.healthy:
                    event.node.touch(event.keys)
            else:
                event.node.state.inflight -= 1
                s, history = event.session, event.prompt + sc.reply_tokens
                if event.turn + 1 < sc.turns:
                    active[s].history = history
                    self._push(t + float(thinks[s, event.turn]), TurnSent(s, event.app, event.turn + 1, history))
                else:
                    active.pop(s, None)
        return self.tally

    def _route(self, turn: TurnSent, prompt: int, t: float) -> str:
        sc, costs = self.sc, self.costs
        keys = self._keys(turn.app, turn.session, prompt)
        request = Request(f"s{turn.session}", keys, prompt, sc.block_tokens)
        decision = self.policy.choose(self.states, request)
        node = self.by_id[decision.node_id]
        cached = decision.cached_tokens if sc.cache else 0
        work = prompt - cached
        start = max(t, node.busy_until)
        node.busy_until = start + (work * costs.prefill_ms_per_token + costs.overhead_ms) / 1000
        node.state.inflight += 1
        node.state.claimed_tokens += work
        node.requests += 1
        tally = self.tally
        tally.requests += 1
        tally.prompt_tokens += prompt
        tally.cached_tokens += cached
        tally.ttft_ms.append((node.busy_until - t) * 1000)
        self._push(node.busy_until, Prefilled(node, work, keys))
        decode_s = sc.reply_tokens * costs.decode_ms_per_token / 1000
        self._push(node.busy_until + decode_s, Done(node, turn.session, turn.app, turn.turn, prompt))
        return decision.node_id

    def _next_request(self, s: int, a: Active) -> Request:
        prompt = a.history + int(self.users[s, min(a.next_turn, self.sc.turns - 1)])
        return Request(f"s{s}", self._keys(a.app, s, prompt), prompt, self.sc.block_tokens)

    def _decisions(self, active: dict[int, Active]) -> dict[int, str]:
        """Where each session in progress would go now (a sample of MOVE_SAMPLE at most)."""
        sample = list(active.items())[:MOVE_SAMPLE]
        return {s: self.policy.choose(self.states, self._next_request(s, a)).node_id for s, a in sample}

    def _fail_one(self, rng: np.random.Generator, active: dict[int, Active]) -> None:
        """A node dies: its store is gone, the router stops choosing it (health checking)."""
        alive = [n for n in self.nodes if n.state.healthy]
        victim = alive[int(rng.integers(0, len(alive)))]
        before = self._decisions(active)
        victim.fail()
        after = self._decisions(active)
        self.tally.asked_at_failure += len(before)
        self.tally.moved_by_failure += sum(before[s] != after[s] for s in before)

    def _add_one(self, active: dict[int, Active]) -> None:
        before = self._decisions(active)
        self._new_node()
        after = self._decisions(active)
        self.tally.asked_at_addition += len(before)
        self.tally.moved_by_addition += sum(before[s] != after[s] for s in before)


def balanced_rate(sc: Scenario, c: Costs) -> float:
    """Sessions per second that load the fleet's prefill to `utilization` when every turn is
    served where its prefix is (naive, computing everything, faces the same rate)."""
    b = sc.block_tokens
    work, history, cached = 0, sc.system_tokens, (sc.system_tokens // b) * b
    for _ in range(sc.turns):
        prompt = history + sc.user_tokens
        work += prompt - min(cached, prompt - 1)
        cached, history = (prompt // b) * b, prompt + sc.reply_tokens
    seconds = (work * c.prefill_ms_per_token + sc.turns * c.overhead_ms) / 1000
    return sc.utilization * sc.nodes / seconds
