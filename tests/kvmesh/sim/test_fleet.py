"""The fleet simulator on small scenarios with known answers (the proxy's real policies)."""

from dataclasses import replace

import pytest

from kvmesh.sim.fleet import Costs, Fleet, Scenario, balanced_rate
from kvmesh.sim.study import POLICIES, run_policy
from proxy.routing import SessionHashPolicy

COSTS = Costs(prefill_ms_per_token=2.0, decode_ms_per_token=10.0, overhead_ms=5.0)
ONE = Scenario(
    nodes=1, sessions=1, rate=1.0, apps=1, system_tokens=512, turns=1, user_tokens=100, reply_tokens=10,
    think_s=1.0, block_tokens=256, fail_at=-1, add_at=-1,
)  # fmt: skip


def test_one_request_alone_costs_its_tokens() -> None:
    tally = Fleet(ONE, COSTS, SessionHashPolicy()).run()
    (ttft,) = tally.ttft_ms
    prompt = tally.prompt_tokens
    assert 512 + 50 <= prompt <= 512 + 150 and tally.cached_tokens == 0
    assert ttft == pytest.approx(prompt * 2.0 + 5.0)


def test_the_second_session_of_an_app_reuses_its_system_prompt() -> None:
    tally = Fleet(replace(ONE, sessions=2, rate=0.01), COSTS, SessionHashPolicy()).run()
    assert tally.requests == 2
    assert tally.cached_tokens == 512  # the second: both system blocks; the first: nothing
    # its time is only for what it computed
    second_prompt = tally.prompt_tokens - round((tally.ttft_ms[0] - 5.0) / 2.0)
    assert tally.ttft_ms[1] == pytest.approx((second_prompt - 512) * 2.0 + 5.0)


def test_later_turns_find_their_earlier_blocks() -> None:
    sc = replace(ONE, turns=3, think_s=0.5, reply_tokens=300)
    tally = Fleet(sc, COSTS, SessionHashPolicy()).run()
    # turn 1 finds nothing; turns 2 and 3 find every full block of the prompt before them
    assert tally.requests == 3 and tally.cached_tokens >= 2 * 512
    assert tally.moved_per_turn == 0 and tally.later_turns == 2


def test_no_cache_computes_everything() -> None:
    outcome = run_policy("naive", replace(ONE, sessions=50, rate=0.5), COSTS)
    assert outcome.cached_ratio == 0 and outcome.requests == 50


def test_unbounded_sticky_never_moves_a_session_and_a_failure_moves_only_its_own() -> None:
    sc = Scenario(
        nodes=16, sessions=3000, apps=4, system_tokens=512, turns=3, user_tokens=40, reply_tokens=20,
        think_s=30.0, block_tokens=256, utilization=0.3, fail_at=-1, add_at=-1, seed=2,
    )  # fmt: skip
    sticky = POLICIES["sticky_unbounded"][0]
    assert Fleet(sc, COSTS, sticky(1.25, 0)).run().moved_per_turn == 0
    tally = Fleet(replace(sc, fail_at=0.5), COSTS, sticky(1.25, 0)).run()
    assert tally.asked_at_failure > 300
    # only the sessions whose node failed are sent elsewhere: about 1/16 of them
    assert 0 < tally.moved_by_failure / tally.asked_at_failure < 3 / 16


def test_the_balanced_rate_loads_the_prefill_as_asked() -> None:
    sc = replace(ONE, nodes=10, turns=2, utilization=0.5)
    # per session: turn 1 computes 512 + 100 - 512 = 100; turn 2: 612 + 10 + 100 = 722, 512 cached -> 210
    assert balanced_rate(sc, COSTS) == pytest.approx(0.5 * 10 / ((310 * 2.0 + 2 * 5.0) / 1000))
