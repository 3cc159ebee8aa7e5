"""Sampling parameters, per-sequence samplers, and stop-string matching."""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import numpy as np

from kvmesh.errors import InvalidArgument

MAX_TOKENS_LIMIT = 1 << 16
MAX_STOPS, MAX_STOP_CHARS = 16, 1024  # stop strings per request, characters per stop string


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 is greedy
    top_k: int = 0  # 0 keeps every token
    top_p: float = 1.0
    seed: int | None = None
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # run to max_tokens (benchmarks and load tests)

    def __post_init__(self) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidArgument(f"temperature must be a finite number >= 0, not {self.temperature}")
        if self.top_k < 0:
            raise InvalidArgument(f"top_k must be >= 0, not {self.top_k}")
        if not math.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            raise InvalidArgument(f"top_p must be in (0, 1], not {self.top_p}")
        if not 1 <= self.max_tokens <= MAX_TOKENS_LIMIT:
            raise InvalidArgument(f"max_tokens must be in [1, {MAX_TOKENS_LIMIT}], not {self.max_tokens}")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise InvalidArgument(f"seed must be in [0, 2**64), not {self.seed}")
        if any(not s for s in self.stop):
            raise InvalidArgument("stop strings must not be empty")
        if len(self.stop) > MAX_STOPS or any(len(s) > MAX_STOP_CHARS for s in self.stop):
            raise InvalidArgument(f"at most {MAX_STOPS} stop strings of at most {MAX_STOP_CHARS} characters")

    @property
    def greedy(self) -> bool:
        """The argmax: no draw is made (and no seed matters)."""
        return self.temperature == 0 or self.top_k == 1


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = z - z.max()
    return np.asarray(z - np.log(np.exp(z).sum()))


class Sampler:
    """One sequence's sampler. The uniform draw for output token i depends only on (seed, i): a
    counter-based generator (Philox keyed by the seed, counter i), so batch mates never change a
    sequence's draws, and a sequence can go on in another process at any token: the prefill node
    draws token 0, the decode node from 1 on, a migrated sequence from the first token not sent.
    Without a seed, one is picked here (the proxy picks one per request, so a migration keeps it)."""

    def __init__(self, params: SamplingParams, index: int = 0) -> None:
        """index: the output token the next sample makes (0: the first after the prompt)."""
        self.params = params
        self.seed = params.seed if params.seed is not None else secrets.randbits(64)
        self.index = index

    def sample(self, logits: np.ndarray) -> tuple[int, float]:
        """logits (vocab,) -> (token, its log-probability under the model's own distribution).
        Runs once per sequence per decode step, so it never sorts the vocabulary: sorting 49,152
        logits took 5.7 ms a token (16 sampled streams: ~90 ms a step, as much as the model)."""
        index, self.index = self.index, self.index + 1
        z = np.asarray(logits, dtype=np.float32)
        top = float(z.max())
        lse = top + float(np.log(np.exp(z - top).sum()))
        p = self.params
        if p.greedy:
            token = int(np.argmax(z))
            return token, float(z[token]) - lse
        u = uniform(self.seed, index)
        if 0 < p.top_k < z.size or p.top_p < 1.0:
            candidates, probs = self._head(z, top)
            cdf = np.cumsum(probs)
            pick = int(np.searchsorted(cdf, u * cdf[-1], side="right"))
            token = int(candidates[min(pick, candidates.size - 1)])
        else:  # temperature alone: the whole distribution, in vocabulary order
            token = _inverse_cdf(np.exp((z - top) / p.temperature), u)
        return token, float(z[token]) - lse

    def _head(self, z: np.ndarray, top: float) -> tuple[np.ndarray, np.ndarray]:
        """The top-k tokens, then the smallest head of them (by logit, ties by id) whose mass under
        the tempered distribution reaches top_p: (ids, their unnormalised weights). Without top-k
        the head is looked for among the best `n` logits (argpartition, then a sort of those n
        only), n growing until the head ends strictly inside them (a tie at the border could
        hide a member); its mass is taken against the whole vocabulary's."""
        p = self.params
        top_k = 0 < p.top_k < z.size
        n = p.top_k if top_k else min(64, z.size)
        total = 0.0 if top_k else float(np.exp((z - top) / p.temperature).sum(dtype=np.float64))
        while True:
            part = np.argpartition(-z, n - 1)[:n] if n < z.size else np.arange(z.size)
            head = part[np.lexsort((part, -z[part]))]  # by logit, ties by id
            w = np.exp((z[head] - top) / p.temperature, dtype=np.float64)
            if p.top_p >= 1.0:
                return head, w
            mass = np.cumsum(w) / (total or w.sum())  # top-k: the mass within the top k
            keep = min(int(np.searchsorted(mass, p.top_p)) + 1, n)
            if top_k or n == z.size or (keep < n and z[head[keep - 1]] > z[head[-1]]):
                return head[:keep], w[:keep]
            n = min(z.size, n * 4)

    @property
    def greedy(self) -> bool:
        return self.params.greedy


CDF_BLOCK = 256


def _inverse_cdf(weights: np.ndarray, u: float) -> int:
    """The token at u of the distribution `weights` (vocab,) in vocabulary order, in two levels:
    sums of blocks of 256, then a cumulative sum within the one block (a float64 cumulative sum
    of the whole vocabulary took ~0.5 ms here)."""
    size = weights.size
    padded = -(-size // CDF_BLOCK) * CDF_BLOCK
    if padded != size:
        weights = np.concatenate([weights, np.zeros(padded - size, weights.dtype)])
    sums = np.cumsum(weights.reshape(-1, CDF_BLOCK).sum(axis=1, dtype=np.float64))
    target = u * sums[-1]
    block = min(int(np.searchsorted(sums, target, side="right")), sums.size - 1)
    within = np.cumsum(weights[block * CDF_BLOCK : (block + 1) * CDF_BLOCK], dtype=np.float64)
    offset = target - (sums[block - 1] if block else 0.0)
    i = min(int(np.searchsorted(within, offset, side="right")), CDF_BLOCK - 1)
    return min(block * CDF_BLOCK + i, size - 1)


def uniform(seed: int, index: int) -> float:
    """The draw for output token `index` of a sequence seeded `seed`: in [0, 1), 53 random bits of
    Philox4x64's block at counter `index` (~20 us: a generator made per draw, no state kept)."""
    raw = int(np.random.Philox(key=seed, counter=index).random_raw())
    return (raw >> 11) * 2.0**-53


class StopMatcher:
    """Holds back text that could be the start of a stop string; cuts at the first full match.

    Linear in the text: per stop string a Knuth-Morris-Pratt state (how much of it the text so far
    ends with), advanced one character at a time; what is held back is the longest such partial
    match. (Searching the held-back text anew each token was quadratic in a long stop string.)"""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = stops
        self._fail = [_failure(s) for s in stops]
        self._state = [0] * len(stops)  # chars of stop i that the text ends with
        self._pending = ""  # text not emitted yet: at most the longest partial match

    def push(self, delta: str) -> tuple[str, bool]:
        """-> (text safe to emit now, whether a stop string was reached)."""
        text = self._pending + delta
        base = len(self._pending)  # text[:base] was already scanned
        for j, c in enumerate(delta):
            done = [len(stop) for i, stop in enumerate(self._stops) if self._advance(i, stop, c) == len(stop)]
            if done:  # matches end here: cut before the longest (the one that started first)
                self._pending, self._state = "", [0] * len(self._stops)
                return text[: base + j + 1 - max(done)], True
        hold = max(self._state, default=0)
        self._pending = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold], False

    def _advance(self, i: int, stop: str, c: str) -> int:
        k, fail = self._state[i], self._fail[i]
        while k and stop[k] != c:
            k = fail[k - 1]
        if stop[k] == c:
            k += 1
        self._state[i] = k
        return k

    def flush(self) -> str:
        out, self._pending = self._pending, ""
        self._state = [0] * len(self._stops)
        return out


def _failure(s: str) -> list[int]:
    """KMP: fail[k] = length of the longest proper prefix of s[:k+1] that is also its suffix."""
    fail, k = [0] * len(s), 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = fail[k - 1]
        if s[i] == s[k]:
            k += 1
        fail[i] = k
    return fail
