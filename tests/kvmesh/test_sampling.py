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


def test_the_top_p_head_is_the_full_sorts_without_sorting_the_vocabulary() -> None:
    """The nucleus found among the best n logits (n growing) is the one a sort of the whole
    vocabulary gives (by logit, ties by id), ties at the border included."""
    from kvmesh.sampling import _inverse_cdf

    rng = np.random.default_rng(8)

    def by_sorting(z: np.ndarray, p: SamplingParams) -> set[int]:
        order = np.lexsort((np.arange(z.size), -z))
        if 0 < p.top_k < z.size:
            order = order[: p.top_k]
        w = np.exp((z[order] - z.max()) / p.temperature, dtype=np.float64)
        keep = int(np.searchsorted(np.cumsum(w) / w.sum(), p.top_p)) + 1 if p.top_p < 1 else order.size
        return set(order[:keep].tolist())

    for trial in range(100):
        z = (rng.standard_normal(3000) * rng.uniform(0.5, 6)).astype(np.float32)
        if trial % 2:
            z[rng.integers(0, 3000, 80)] = np.sort(z)[-100]  # a tie group across the border
        t, top_p = float(rng.uniform(0.3, 2)), float(rng.uniform(0.05, 0.99))
        for p in (SamplingParams(temperature=t, top_p=top_p), SamplingParams(temperature=t, top_p=top_p, top_k=500)):
            head, _ = Sampler(p)._head(z, float(z.max()))
            assert set(head.tolist()) == by_sorting(z, p)
    w = rng.random(1000)
    cdf = np.cumsum(w)
    for u in rng.random(500):
        assert _inverse_cdf(w, float(u)) == min(int(np.searchsorted(cdf, u * cdf[-1], side="right")), 999)


def test_temperature_alone_draws_by_the_distribution() -> None:
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    sampler = Sampler(SamplingParams(temperature=1.0, seed=3))
    draws = np.bincount([sampler.sample(np.log(probs))[0] for _ in range(4000)], minlength=4) / 4000
    assert np.allclose(draws, probs, atol=0.03)
