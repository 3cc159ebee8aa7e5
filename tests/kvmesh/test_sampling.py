import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmesh.errors import InvalidArgument
from kvmesh.sampling import Sampler, SamplingParams, StopMatcher

LOGITS = np.array([1.0, 3.0, 2.5, -1.0, 0.5, 2.9], np.float32)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": math.nan},
        {"temperature": -0.1},
        {"temperature": math.inf},
        {"top_k": -1},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"top_p": math.nan},
        {"max_tokens": 0},
        {"max_tokens": -3},
        {"max_tokens": 10**9},
        {"seed": -1},
        {"stop": ("",)},
    ],
)
def test_bad_values_are_invalid_arguments(kwargs: dict[str, object]) -> None:
    with pytest.raises(InvalidArgument):
        SamplingParams(**kwargs)  # type: ignore[arg-type]


def test_greedy_takes_the_argmax_with_its_logprob() -> None:
    token, logprob = Sampler(SamplingParams()).sample(LOGITS)
    z = LOGITS.astype(np.float64)
    assert token == 1
    assert logprob == pytest.approx(z[1] - np.log(np.exp(z).sum()))


def test_same_seed_same_draws_and_top_k_bounds_them() -> None:
    params = SamplingParams(temperature=1.5, top_k=3, seed=7)
    a = [Sampler(params).sample(LOGITS)[0] for _ in range(3)]
    s1, s2 = Sampler(params), Sampler(params)
    draws = [s1.sample(LOGITS)[0] for _ in range(200)]
    assert draws == [s2.sample(LOGITS)[0] for _ in range(200)]
    assert set(draws) == {1, 2, 5} and len(set(a)) == 1


def test_a_draw_depends_only_on_the_seed_and_the_token_index() -> None:
    """A sequence resumed at token i elsewhere (a migration) draws what the first sampler drew at
    i, whatever it sampled before; greedy samples count their index too."""
    params = SamplingParams(temperature=1.0, seed=11)
    rng = np.random.default_rng(4)
    rows = [rng.standard_normal(64).astype(np.float32) for _ in range(40)]
    whole = Sampler(params)
    draws = [whole.sample(r)[0] for r in rows]
    for i in (1, 17, 39):
        resumed = Sampler(params, i)
        assert [resumed.sample(r)[0] for r in rows[i:]] == draws[i:]
    assert len(set(draws)) > 10  # really sampled
    unseeded = [Sampler(SamplingParams(temperature=1.0)) for _ in range(2)]
    assert unseeded[0].seed != unseeded[1].seed


def test_top_p_keeps_the_smallest_head_reaching_the_mass() -> None:
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    draws = {Sampler(SamplingParams(temperature=1.0, top_p=0.75, seed=s)).sample(logits)[0] for s in range(300)}
    assert draws == {0, 1}


def test_stop_matcher_holds_back_a_possible_stop_and_cuts_at_it() -> None:
    m = StopMatcher(("STOP", "\n\n"))
    assert m.push("abc S") == ("abc ", False)
    assert m.push("TO") == ("", False)
    assert m.push("x") == ("STOx", False)
    assert m.push(" end ST") == (" end ", False)
    assert m.push("OP tail") == ("", True)


def test_stop_matcher_flushes_what_it_held() -> None:
    m = StopMatcher(("STOP",))
    assert m.push("ab ST") == ("ab ", False)
    assert m.flush() == "ST"


def _reference(stops: tuple[str, ...], deltas: list[str]) -> tuple[str, bool]:
    """All text, then cut before the stop string that completes first (ties: the longest)."""
    text = "".join(deltas)
    ends = [(text.find(s) + len(s), -len(s)) for s in stops if s in text]
    if not ends:
        return text, False
    end, neg = min(ends)
    return text[: end + neg], True


@given(
    st.lists(st.text("ab\n", min_size=1, max_size=5), min_size=1, max_size=3),
    st.lists(st.text("ab\n", max_size=6), max_size=12),
)
@settings(max_examples=300, deadline=None)
def test_stop_matcher_agrees_with_a_plain_search(stops: list[str], deltas: list[str]) -> None:
    m = StopMatcher(tuple(stops))
    out, stopped, seen = "", False, 0
    for d in deltas:
        text, stopped = m.push(d)
        out, seen = out + text, seen + 1
        if stopped:
            break
    if not stopped:
        out += m.flush()
    assert (out, stopped) == _reference(tuple(stops), deltas[:seen])


def test_long_stop_strings_are_refused_before_any_work() -> None:
    with pytest.raises(InvalidArgument, match="stop strings"):
        SamplingParams(stop=("x" * 600_000,))
    with pytest.raises(InvalidArgument, match="stop strings"):
        SamplingParams(stop=tuple(str(i) for i in range(17)))
