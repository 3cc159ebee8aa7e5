"""One process, one sequence: prefill, then decode steps, streamed as text deltas."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from kvmesh.errors import InvalidArgument
from kvmesh.model.batch import decode_loop
from kvmesh.model.runner import ModelRunner
from kvmesh.model.tokenizer import ChatTokenizer, StreamDecoder
from kvmesh.sampling import Sampler, SamplingParams, StopMatcher


@dataclass(frozen=True)
class Delta:
    token_id: int | None  # None: text held back for a possible stop string, released at the end
    text: str  # may be empty while a character or a possible stop string is incomplete


@dataclass(frozen=True)
class Finished:
    reason: str  # "eos" | "stop" (a stop string) | "length" (max_tokens or the context)
    text: str
    prompt_tokens: int
    token_ids: list[int] = field(default_factory=list)
    ttft_s: float = 0.0  # prompt in, first token sampled
    decode_s: float = 0.0  # first token to the last


def check_prompt(prompt: Sequence[int], context: int) -> None:
    if not prompt:
        raise InvalidArgument("empty prompt")
    if len(prompt) >= context:
        raise InvalidArgument(f"prompt of {len(prompt)} tokens does not fit the model's context of {context} tokens")


def generate(
    runner: ModelRunner, tok: ChatTokenizer, prompt: Sequence[int], params: SamplingParams
) -> Iterator[Delta | Finished]:
    check_prompt(prompt, runner.max_context)
    budget = min(params.max_tokens, runner.max_context - len(prompt))
    start = time.perf_counter()
    logits, kv = runner.prefill(prompt)
    decoder = decode_loop(runner, kv, len(prompt) + budget)
    sampler, detok, stops = Sampler(params), StreamDecoder(tok), StopMatcher(params.stop)
    ids: list[int] = []
    text: list[str] = []
    reason, first = "length", 0.0
    for _ in range(budget):
        token, _logprob = sampler.sample(logits)
        first = first or time.perf_counter()
        if token in tok.eos_token_ids and not params.ignore_eos:
            reason = "eos"
            break
        ids.append(token)
        delta, hit = stops.push(detok.push(token))
        text.append(delta)
        yield Delta(token, delta)
        if hit:
            reason = "stop"
            break
        if len(ids) < budget:
            logits = decoder.step(token)
    if reason != "stop":
        tail, _ = stops.push(detok.flush())
        tail += stops.flush()
        text.append(tail)
        if tail:
            yield Delta(None, tail)
    end = time.perf_counter()
    yield Finished(reason, "".join(text), len(prompt), ids, (first or end) - start, end - (first or end))
