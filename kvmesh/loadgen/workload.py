"""The bench workload: N users across K apps, each app with its own shared system prompt, each
user one multi-turn session; session starts a Poisson process (open loop) or back to back per
user slot (closed loop); message lengths and think times drawn from a seeded generator, so the
same spec and seed give the same workload, text included."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kvmesh.settings import doc

Encode = Callable[[str], list[int]]
Decode = Callable[[Sequence[int]], str]

# Plain words to build prompts from: only their token counts matter to the serving path.
WORDS = tuple((Path(__file__).parent / "words.txt").read_text().split())


@dataclass(frozen=True)
class WorkloadSpec:
    users: int = field(default=16, metadata=doc("users, one multi-turn session each"))
    apps: int = field(default=2, metadata=doc("apps, each with its own shared system prompt"))
    system_tokens: int = field(default=2000, metadata=doc("tokens of each app's system prompt"))
    turns: int = field(default=3, metadata=doc("turns per session"))
    user_tokens: int = field(default=50, metadata=doc("mean user message tokens (uniform, mean/2 to 3 mean/2)"))
    max_tokens: int = field(default=32, metadata=doc("tokens per reply at most"))
    think_s: float = field(default=2.0, metadata=doc("mean think time before a next turn (exponential)"))
    rate: float = field(default=0.25, metadata=doc("open loop: sessions started per second (Poisson)"))
    closed_loop: bool = field(default=False, metadata=doc("closed loop: --concurrency users at a time"))
    concurrency: int = field(default=4, metadata=doc("closed loop: users at a time"))
    seed: int = field(default=0, metadata=doc("the workload's seed: same seed, same workload"))

    def __post_init__(self) -> None:
        if min(self.users, self.apps, self.turns, self.max_tokens, self.concurrency) < 1:
            raise ValueError("users, apps, turns, max_tokens and concurrency must be >= 1")
        if self.system_tokens < 0 or self.user_tokens < 2 or self.think_s < 0 or self.rate <= 0:
            raise ValueError("system_tokens >= 0, user_tokens >= 2, think_s >= 0, rate > 0")


@dataclass(frozen=True)
class Turn:
    user: str  # the user's message
    think_s: float  # pause before sending it (0 for the first turn)


@dataclass(frozen=True)
class Session:
    session_id: str
    app: int
    start_s: float  # open loop: when its first turn is sent, from the start of the run
    turns: tuple[Turn, ...]


@dataclass(frozen=True)
class Workload:
    spec: WorkloadSpec
    systems: tuple[str, ...]  # one per app
    sessions: tuple[Session, ...]

    @property
    def requests(self) -> int:
        return sum(len(s.turns) for s in self.sessions)


def text_of(rng: np.random.Generator, tokens: int, encode: Encode, decode: Decode) -> str:
    """Words until the tokenizer counts `tokens`, cut there."""
    words: list[str] = []
    while len(encode(" ".join(words))) < tokens:
        words += [WORDS[i] for i in rng.integers(0, len(WORDS), max(tokens // 2, 8))]
    return decode(encode(" ".join(words))[:tokens]).strip()


def _system(rng: np.random.Generator, app: int, tokens: int, encode: Encode, decode: Decode) -> str:
    """App `app`'s system prompt: a line naming it, then words, `tokens` in all (about)."""
    if not tokens:
        return ""
    head = f"You are the assistant of app {app}. "
    return head + text_of(rng, max(tokens - len(encode(head)), 1), encode, decode)


def build_workload(spec: WorkloadSpec, encode: Encode, decode: Decode) -> Workload:
    rng = np.random.default_rng(spec.seed)
    systems = tuple(_system(rng, a, spec.system_tokens, encode, decode) for a in range(spec.apps))
    arrivals = np.cumsum(rng.exponential(1 / spec.rate, spec.users))
    arrivals -= arrivals[0]  # the first session starts at once
    sessions = []
    for u in range(spec.users):
        turns = []
        for t in range(spec.turns):
            length = int(rng.integers(spec.user_tokens // 2, spec.user_tokens * 3 // 2 + 1))
            think = float(rng.exponential(spec.think_s)) if t else 0.0
            turns.append(Turn(text_of(rng, length, encode, decode), think))
        sessions.append(Session(f"user-{u}", int(rng.integers(0, spec.apps)), float(arrivals[u]), tuple(turns)))
    return Workload(spec, systems, tuple(sessions))
