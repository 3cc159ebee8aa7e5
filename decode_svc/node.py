"""A decode node: admission, the KV pull, the first token at once, then the batch's tokens as
text. Asyncio-facing; no protobuf here (the servicer converts)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import cast

from decode_svc.batcher import Batcher, KeepKV, Sequence
from decode_svc.config import DecodeConfig
from decode_svc.metrics import DecodeMetrics
from decode_svc.sources import Prefilled, PrefillJob, RemotePrefill, Source, StoreJob
from decode_svc.writeback import WriteBack, settle
from kvmesh.errors import InvalidArgument, KvmeshError, ResourceExhausted, Unavailable
from kvmesh.model.folder import ModelFolder
from kvmesh.model.kv import KVCache
from kvmesh.model.prepare import default_model_dir
from kvmesh.model.runner import ModelRunner, Provider, RunnerConfig
from kvmesh.model.tokenizer import ChatTokenizer, StreamDecoder
from kvmesh.model.turns import Turns
from kvmesh.sampling import Sampler, SamplingParams, StopMatcher

log = logging.getLogger(__name__)
# Done waits this long at most for the sequence's write-back to reach the prefill node's store
# writer (its blocks are then found by the next prompt: the writer writes them at once for it).
WRITE_BACK_WAIT_S = 2.0


@dataclass(frozen=True)
class DecodeJob:
    request_id: str
    tokens: Seq[int]
    params: SamplingParams
    prefill_node: str
    salt: bytes = b""
    wire_dtype: int = 0
    keep_kv: bool = False  # write the new full blocks back to the prefill node's store at the end


@dataclass(frozen=True)
class Token:
    token_id: int
    text: str
    logprob: float


@dataclass(frozen=True)
class HeldBack:
    """Text held back while it might have begun a stop string, released at the end: no token."""

    text: str


@dataclass(frozen=True)
class Done:
    reason: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    ttft_ms: float
    kv_transfer_ms: float
    kv_bytes: int
    decode_ms: float
    prefill_compute_ms: float
    store_read_ms: float


@dataclass(frozen=True)
class Load:
    running: int
    kv_tokens_held: int
    tokens_reserved: int
    waiting: int
    free_slots: int


class DecodeNode:
    """turns: a colocated worker's, whose prefill chunks take turns with this node's steps on the
    shared model; such a worker then sets `source` to its in-process prefill (worker/)."""

    def __init__(self, config: DecodeConfig, turns: Turns | None = None) -> None:
        self.config = config
        self.folder = ModelFolder.load(config.model or default_model_dir("int4"))
        provider = cast(Provider, config.provider)
        runner_config = RunnerConfig(
            threads=config.threads, provider=provider, use_decode_graph=not config.exact_decode
        )
        self.runner = ModelRunner(self.folder, runner_config)
        log.info("decode numerics: %s", self.runner.decode_numerics)
        self.tokenizer = ChatTokenizer(self.folder)
        self.capacity = min(config.slot_tokens or self.runner.max_context, self.runner.max_context)
        self.metrics = DecodeMetrics()
        self.batcher = Batcher(
            self.runner,
            config.slots,
            self.capacity,
            self.metrics.on_step,
            turns,
            min(config.warm_tokens, self.capacity),
            config.kv_budget_tokens,
        )
        self.node_id = config.node_id
        self.on_unhealthy: Callable[[], None] = lambda: None  # the server's: health NOT_SERVING
        self.batcher.on_fault = self._fault
        self.writeback = WriteBack(
            lambda: self.source, lambda outcome, n: self.metrics.written_back.labels(outcome).inc(n)
        )
        self._reserved = 0
        self._admitted = 0
        self._draining = False
        self.source: Source = RemotePrefill(
            self.folder.fingerprint,
            self.runner.layout,
            self.runner.vocab_size,
            config.cluster_token,
            config.stall_timeout_s,
        )

    def _fault(self, error: BaseException) -> None:
        self.metrics.faults.labels(type(error).__name__).inc()
        self.on_unhealthy()

    def load(self) -> Load:
        running = self.batcher.running  # may still hold a cancelled sequence until the next step
        waiting = max(self._admitted - running, 0)
        return Load(running, self.batcher.tokens_held, self._reserved, waiting, self.config.slots - running)

    def _admit(self, job: DecodeJob) -> int:
        """Check the request and reserve its tokens. -> how many tokens it may make."""
        if self._draining:
            raise Unavailable("this decode node is draining")
        if not job.tokens:
            raise InvalidArgument("empty prompt")
        self.runner.check_tokens(job.tokens)
        if len(job.tokens) >= self.capacity:
            raise InvalidArgument(
                f"prompt of {len(job.tokens)} tokens does not fit a sequence of {self.capacity} tokens"
            )
        budget = min(job.params.max_tokens, self.capacity - len(job.tokens))
        if self._admitted >= self.config.slots + self.config.max_waiting:
            raise ResourceExhausted(f"{self._admitted} requests admitted: all slots busy and the wait list full")
        if self._reserved + len(job.tokens) + budget > self.config.kv_budget_tokens:
            raise ResourceExhausted(
                f"{len(job.tokens)} prompt + {budget} new tokens do not fit the KV budget: "
                f"{self._reserved} of {self.config.kv_budget_tokens} tokens reserved"
            )
        self._admitted += 1
        self._reserved += len(job.tokens) + budget
        self.metrics.waiting.set(max(self._admitted - self.batcher.running, 0))
        return budget

    async def decode(self, job: DecodeJob, timeout_s: float | None) -> AsyncIterator[Token | HeldBack | Done]:
        """The first token as soon as the prefill gives it, then the batch's; Done with usage."""
        budget = self._admit(job)
        start = time.perf_counter()
        seq: Sequence | None = None
        try:
            info, kv_pending = await self.source.start(self._prefill_job(job, timeout_s))
            reply = _Reply(self.tokenizer, job, info, time.perf_counter() - start)
            self.metrics.ttft.observe(reply.ttft)
            eos = () if job.params.ignore_eos else self.tokenizer.eos_token_ids
            if info.first_token in eos:
                kv_pending.cancel()  # nothing to decode: stop the KV stream
                yield reply.done("eos")
                return
            first, stopped = reply.push(info.first_token, info.first_logprob)
            yield first
            if stopped or budget == 1:
                kv_pending.cancel()
                for event in reply.end("stop" if stopped else "length"):
                    yield event
                return
            kv = await kv_pending.result()
            reply.received(time.perf_counter() - start)
            self.metrics.kv_bytes.inc(info.kv_bytes)
            self.metrics.transfer.observe(reply.transfer_s)
            sampler = Sampler(job.params)
            sampler.skip()  # the prefill node drew the first token with the same seed
            events: asyncio.Queue[tuple[int, float] | tuple[str, str]] = asyncio.Queue()
            loop = asyncio.get_running_loop()

            def emit(item: tuple[int, float] | tuple[str, str]) -> None:  # from the batcher thread
                loop.call_soon_threadsafe(events.put_nowait, item)

            seq = Sequence(job.request_id, info.first_token, sampler, budget - 1, eos, emit, group=job.salt)
            stored: asyncio.Future[None] = loop.create_future()
            seq.tokens, seq.keep = [*job.tokens, info.first_token], self._keep(job, info, stored)
            self.batcher.submit(seq, kv)
            del kv
            while True:
                item = await events.get()
                if item == ("end", "error"):
                    raise KvmeshError("the decode step failed")  # INTERNAL; the node is NOT_SERVING
                if item[0] == "end":
                    if seq.keep is not None:  # the next turn, sent once Done is heard, finds the blocks stored
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(asyncio.shield(stored), WRITE_BACK_WAIT_S)
                    for event in reply.end(str(item[1])):
                        yield event
                    return
                token, stopped = reply.push(*cast(tuple[int, float], item))
                yield token
                if stopped:
                    yield reply.done("stop")
                    return
        finally:
            if seq is not None:
                self.batcher.cancel(seq)  # a no-op for a finished sequence; frees a cancelled one's slot
            self._admitted -= 1
            self._reserved -= len(job.tokens) + budget

    def _keep(self, job: DecodeJob, info: Prefilled, stored: asyncio.Future[None]) -> KeepKV | None:
        """The write-back of a sequence asked to keep its KV, from the first block its prompt did
        not fill (the prefill node stored those before); `stored` is set once it is done."""
        if not job.keep_kv or not info.block_size:
            return None
        first = len(job.tokens) // info.block_size
        loop = stored.get_loop()

        def send(tokens: list[int], kv: KVCache | None) -> None:  # from the batcher thread
            if kv is None:
                loop.call_soon_threadsafe(settle, stored)
            else:
                self.writeback.offer(StoreJob(job.request_id, tokens, job.salt, first, kv, job.prefill_node, stored))

        return KeepKV(first, info.block_size, send)

    def _prefill_job(self, job: DecodeJob, timeout_s: float | None) -> PrefillJob:
        timeout = timeout_s or self.config.prefill_timeout_s
        return PrefillJob(job.request_id, job.tokens, job.params, job.salt, job.wire_dtype, job.prefill_node, timeout)

    def start(self) -> None:
        """On the server's loop: the write-back task."""
        self.writeback.start()

    def drain(self) -> None:
        self._draining = True

    def idle(self) -> bool:
        """No request admitted: none waiting, prefilling or decoding (what a drain waits for)."""
        return self._admitted == 0

    async def close(self) -> None:
        self.batcher.close()
        await self.writeback.close()
        await self.source.close()


class _Reply:
    """One request's reply as it is made: token ids -> text deltas (incremental detokenization,
    then stop strings), and its Done with usage and timings (logged)."""

    def __init__(self, tokenizer: ChatTokenizer, job: DecodeJob, info: Prefilled, ttft_s: float) -> None:
        self._detok, self._stops = StreamDecoder(tokenizer), StopMatcher(job.params.stop)
        self.job, self.info, self.ttft = job, info, ttft_s
        self.count = 0
        self.transfer_s = 0.0
        self._received = 0.0  # perf_counter when the KV was in

    def push(self, token: int, logprob: float) -> tuple[Token, bool]:
        """-> the token's event, and whether a stop string ended the reply with it."""
        self.count += 1
        delta, stopped = self._stops.push(self._detok.push(token))
        return Token(token, delta, logprob), stopped

    def received(self, since_start_s: float) -> None:
        self.transfer_s, self._received = since_start_s - self.ttft, time.perf_counter()

    def end(self, reason: str) -> list[HeldBack | Done]:
        """The reply ends for `reason`: the text held back for a stop string that never came, then
        Done (after a stop string, what was held back was the stop string: dropped)."""
        if reason == "stop":
            return [self.done(reason)]
        tail, _ = self._stops.push(self._detok.flush())
        tail += self._stops.flush()
        return [HeldBack(tail), self.done(reason)] if tail else [self.done(reason)]

    def done(self, reason: str) -> Done:
        decode_s = time.perf_counter() - self._received if self._received else 0.0
        job, info = self.job, self.info
        log.info(
            "decode done",
            extra={
                "request_id": job.request_id,
                "reason": reason,
                "prompt_tokens": len(job.tokens),
                "cached_tokens": info.cached_tokens,
                "completion_tokens": self.count,
                "ttft_ms": round(self.ttft * 1000, 1),
                "kv_bytes": info.kv_bytes,
            },
        )
        return Done(
            reason,
            len(job.tokens),
            info.cached_tokens,
            self.count,
            self.ttft * 1000,
            self.transfer_s * 1000,
            info.kv_bytes,
            decode_s * 1000,
            info.compute_ms,
            info.store_read_ms,
        )
