"""Property tests of the routing policies (hypothesis)."""

import asyncio
import contextlib
import math

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.routing import CacheAwarePolicy, NodeState, Request, SessionHashPolicy, cached_tokens, first_choice

node_ids = st.lists(st.text("abcdef0123456789:", min_size=3, max_size=8), min_size=2, max_size=8, unique=True)
sessions = st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=60, unique=True)
BLOCK = 16


@given(node_ids, sessions, st.data())
def test_removing_a_node_moves_only_its_sessions(nodes: list[str], ss: list[str], data: st.DataObject) -> None:
    gone = data.draw(st.sampled_from(nodes))
    rest = [n for n in nodes if n != gone]
    for s in ss:
        before, after = first_choice(s, nodes), first_choice(s, rest)
        assert before in (gone, after)


def _request(session: str, keys: list[bytes], tokens: int | None = None) -> Request:
    return Request(session, keys, tokens if tokens is not None else len(keys) * BLOCK + 5, BLOCK)


@settings(max_examples=60)
@given(
    node_ids,
    st.lists(st.text(min_size=1, max_size=6), min_size=1, max_size=80),
    st.floats(1.05, 2.0),
    st.sampled_from(["session_hash", "cache_aware"]),
)
def test_no_node_is_sent_work_above_the_load_bound(nodes: list[str], arrivals: list[str], c: float, name: str) -> None:
    states = [NodeState(n) for n in nodes]
    policy = SessionHashPolicy(c) if name == "session_hash" else CacheAwarePolicy(c)
    for i, session in enumerate(arrivals):
        total = sum(s.inflight for s in states)
        cap = math.ceil(c * (total + 1) / len(states))
        chosen = policy.choose(states, _request(session, [bytes([i % 7]) * 16]))
        node = next(s for s in states if s.node_id == chosen.node_id)
        assert node.inflight + 1 <= cap
        node.inflight += 1
        if i % 3 == 2:  # some requests finish
            max(states, key=lambda s: s.inflight).inflight -= 1


@given(
    node_ids, st.lists(st.integers(0, 6), min_size=2, max_size=8), st.text(min_size=1, max_size=8), st.integers(1, 6)
)
def test_cache_aware_takes_the_longest_cached_prefix_unless_over_the_bound(
    nodes: list[str], prefix_lengths: list[int], session: str, prompt_blocks: int
) -> None:
    keys = [bytes([b]) * 16 for b in range(prompt_blocks)]
    states = [NodeState(n, blocks=set(keys[: prefix_lengths[i % len(prefix_lengths)]])) for i, n in enumerate(nodes)]
    request = _request(session, keys)
    best = max(cached_tokens(s, request) for s in states)
    chosen = CacheAwarePolicy().choose(states, request)
    assert chosen.cached_tokens == best  # no load anywhere: the longest prefix wins
    holder = next(s for s in states if s.node_id == chosen.node_id)
    holder.inflight = 10  # now far above the bound
    second = CacheAwarePolicy().choose(states, request)
    assert second.node_id != holder.node_id
    if best > 0 and second.cached_tokens < best:
        assert second.reason == "load_overflow"


def test_unhealthy_nodes_leave_the_candidates() -> None:
    states = [NodeState("a", healthy=False), NodeState("b"), NodeState("c", healthy=False)]
    for s in ("x", "y", "z"):
        assert CacheAwarePolicy().choose(states, _request(s, [])).node_id == "b"
        assert SessionHashPolicy().choose(states, _request(s, [])).node_id == "b"


def test_closing_the_backends_is_bounded_when_a_watch_ignores_its_cancel() -> None:
    """Python 3.11's wait_for could swallow a cancel that came as its answer did; a watch that goes
    on after close() cancelled it must not hold close() (a proxy's stop) forever."""
    from proxy.backends import Backends

    async def main() -> None:
        backends = Backends(("127.0.0.1:1",), ("127.0.0.1:1",), 8)
        backends.start()
        cancels = 0

        async def stubborn() -> None:
            nonlocal cancels
            while True:
                try:
                    await asyncio.sleep(30)
                except asyncio.CancelledError:
                    cancels += 1
                    if cancels > 1:
                        raise

        task = asyncio.create_task(stubborn())
        backends._tasks.append(task)
        await asyncio.sleep(0)
        await asyncio.wait_for(backends.close(), 30)  # a guard against a hang, not a timing
        assert cancels == 1 and not task.done()
        assert all(t.done() for ts in backends._node_tasks.values() for t in ts)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(main())
