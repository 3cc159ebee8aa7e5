"""The bench workload generator: seeded reproducibility and its distributions."""

from dataclasses import replace

import numpy as np
import pytest

from kvmesh.loadgen.workload import WorkloadSpec, build_workload
from kvmesh.model.folder import ModelFolder
from kvmesh.model.tokenizer import ChatTokenizer


@pytest.fixture(scope="module")
def tok(tiny_fp32: ModelFolder) -> ChatTokenizer:
    return ChatTokenizer(tiny_fp32)


def test_same_seed_same_workload_other_seed_another(tok: ChatTokenizer) -> None:
    spec = WorkloadSpec(users=8, apps=3, system_tokens=120, turns=3, user_tokens=12, seed=7)
    a, b = build_workload(spec, tok.encode, tok.decode), build_workload(spec, tok.encode, tok.decode)
    assert a == b  # text, arrivals, think times, apps: all of it
    c = build_workload(replace(spec, seed=8), tok.encode, tok.decode)
    assert c.sessions != a.sessions and c.systems != a.systems


def test_lengths_apps_and_shape(tok: ChatTokenizer) -> None:
    spec = WorkloadSpec(users=40, apps=4, system_tokens=200, turns=2, user_tokens=20, seed=1)
    w = build_workload(spec, tok.encode, tok.decode)
    assert len(w.sessions) == 40 and w.requests == 80 and len(w.systems) == 4
    assert len(set(w.systems)) == 4  # each app its own system prompt
    for system in w.systems:  # the configured length, give or take a token where the parts meet
        assert abs(len(tok.encode(system)) - 200) <= 2
    lengths = [len(tok.encode(t.user)) for s in w.sessions for t in s.turns]
    assert min(lengths) >= 20 // 2 - 1 and max(lengths) <= 20 * 3 // 2 + 1
    assert abs(np.mean(lengths) - 20) < 3
    assert {s.app for s in w.sessions} == {0, 1, 2, 3}
    assert all(s.turns[0].think_s == 0 for s in w.sessions)


def test_poisson_arrivals_and_exponential_think_times(tok: ChatTokenizer) -> None:
    spec = WorkloadSpec(users=2000, apps=1, system_tokens=0, turns=2, user_tokens=2, rate=4.0, think_s=3.0, seed=3)
    w = build_workload(spec, tok.encode, tok.decode)
    starts = np.array([s.start_s for s in w.sessions])
    gaps = np.diff(starts)
    assert starts[0] == 0 and (gaps >= 0).all()
    assert abs(gaps.mean() - 1 / 4.0) < 0.02  # mean inter-arrival 1/rate
    assert abs(gaps.std() / gaps.mean() - 1) < 0.1  # exponential: coefficient of variation 1
    thinks = np.array([s.turns[1].think_s for s in w.sessions])
    assert abs(thinks.mean() - 3.0) < 0.2
    assert w.systems == ("",)  # no system prompt when its length is 0


def test_bad_specs_are_refused() -> None:
    for bad in ({"users": 0}, {"rate": 0}, {"user_tokens": 1}, {"turns": 0}):
        with pytest.raises(ValueError):
            WorkloadSpec(**bad)  # type: ignore[arg-type]
