"""What a routed request holds on its nodes, against the nodes' own load reports."""

import asyncio

from proxy.node import _Claim
from proxy.routing import CacheAwarePolicy, NodeState, Request


def test_a_report_counting_our_request_does_not_outlive_it() -> None:
    async def scenario() -> None:
        cached, other = NodeState("cached", blocks={b"a", b"b"}), NodeState("other")
        decode = NodeState("decode")
        request = Request("s", [b"a", b"b"], 40, 16)
        claim = _Claim(cached, decode, work=8)
        assert (cached.inflight, decode.inflight, cached.queued_tokens) == (1, 1, 8)
        cached.reported_tokens = 40  # the node's report, asked while it computed our whole prompt
        assert cached.queued_tokens == 40  # ours counted once, not 8 + 40
        claim.prefilled()
        assert cached.queued_tokens == 0  # that report described a request no longer there
        claim.release()
        claim.release()  # once only
        assert (cached.inflight, decode.inflight) == (0, 0)
        # the session's next turn goes back to its cache
        assert CacheAwarePolicy().choose([cached, other], request).node_id == "cached"

    asyncio.run(scenario())


def test_a_second_request_for_a_prefix_being_computed_queues_behind_it() -> None:
    async def scenario() -> None:
        busy, idle, decode = NodeState("busy"), NodeState("idle"), NodeState("decode")
        keys = [bytes([i]) * 16 for i in range(8)]  # a new 128-token system prompt, cached nowhere
        request = Request("second", keys, 130, 16)
        first = _Claim(busy, decode, work=130, computes=keys)
        # on `busy` the second request waits for the first (130 queued) and then reuses its blocks;
        # on `idle` it would compute all 130 tokens again
        assert CacheAwarePolicy().choose([busy, idle], request).node_id == "busy"
        first.release()
        assert busy.pending == {}
        assert CacheAwarePolicy().choose([busy, idle], Request("third", keys, 130, 16)).cached_tokens == 0

    asyncio.run(scenario())
