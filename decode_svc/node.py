"""A decode node: admission, the KV pull, the first token at once, then the batch's tokens as
text. Asyncio-facing; no protobuf here (the servicer converts)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from decode_svc.batcher import Batcher, KeepKV, Sequence
from decode_svc.config import DecodeConfig
from decode_svc.metrics import DecodeMetrics
from decode_svc.sources import PendingKV, Prefilled, PrefillJob, RemotePrefill, Source, StoreJob
from decode_svc.writeback import WriteBack
from kvmesh.errors import InvalidArgument, KvmeshError, ResourceExhausted, Unavailable
from kvmesh.model.folder import ModelFolder
from kvmesh.model.kv import KVCache
from kvmesh.model.prepare import default_model_dir
from kvmesh.model.runner import DecodeNumerics, ModelRunner, Provider, RunnerConfig
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
    keep_kv: bool = False  # write each new full block back to the prefill node's store as it fills
    generated: int = 0  # a migrated request: the last `generated` tokens are output sent already
    first_timeout_s: float = 0.0  # the proxy's wait for the first token (DecodeRequest.first_token_timeout_ms)


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
class Ready:
    """The stream's first event: what the prefill node supplied (Prefilled on the wire)."""

    cached_tokens: int
    replayed_tokens: int  # a resumption's output run again through decode steps here


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
    replayed_tokens: int = 0


Event = Token | HeldBack | Ready | Done
Item = tuple[int, float] | tuple[str, str]  # what the batcher emits: (token, logprob) or ("end", reason)
T = TypeVar("T")


def _emitter(events: asyncio.Queue[Item]) -> Callable[[Item], None]:
    """The batcher thread's way into a stream's queue on this loop."""
    loop = asyncio.get_running_loop()

    def emit(item: Item) -> None:
        loop.call_soon_threadsafe(events.put_nowait, item)

    return emit


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
        numerics = cast(DecodeNumerics, config.decode_numerics)
        self.runner = ModelRunner(self.folder, RunnerConfig(config.threads, provider, decode_numerics=numerics))
        log.info("decode numerics: %s", self.runner.decode_numerics_said)
        # int8-activation decode steps: the KV they make is written back flagged, for resumptions
        # (the prefill node may recompute a finished reply's blocks exactly for the next turn)
        self._decoded_kv = self.runner.decode_numerics != self.runner.prefill_numerics
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
        self._streams: set[asyncio.Queue[Item]] = set()  # each running request's events
        self._evicted: asyncio.Future[None] | None = None  # set when the drain's time is over
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
        if job.generated >= len(job.tokens):
            raise InvalidArgument(f"{job.generated} generated tokens of {len(job.tokens)}: a prompt must precede them")
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

    async def decode(self, job: DecodeJob, timeout_s: float | None) -> AsyncIterator[Event]:
        """Ready, the first token as soon as the prefill gives it, then the batch's; Done with usage.
        A resumption (job.generated): Ready once its KV is in, then the tokens after those sent."""
        budget = self._admit(job)
        start = time.perf_counter()
        seq: Sequence | None = None
        pending: list[PendingKV] = []  # the KV behind the first token, until the sequence joins
        events: asyncio.Queue[Item] = asyncio.Queue()
        self._streams.add(events)
        try:
            info, kv_pending = await self._unless_evicted(self.source.start(self._prefill_job(job, timeout_s)))
            pending.append(kv_pending)
            reply = _Reply(self.tokenizer, job, info, time.perf_counter() - start)
            eos = () if job.params.ignore_eos else self.tokenizer.eos_token_ids
            if job.generated:
                seq, stored = await self._resume(job, info, kv_pending, reply, budget, eos, events, start)
                yield Ready(info.cached_tokens, reply.replayed)
            else:
                self.metrics.ttft.observe(reply.ttft)
                yield Ready(info.cached_tokens, 0)
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
                kv = await self._unless_evicted(kv_pending.result())
                reply.received(time.perf_counter() - start)
                sampler = Sampler(job.params, 1)  # the prefill node drew token 0 with the same seed
                seq = Sequence(job.request_id, info.first_token, sampler, budget - 1, eos, _emitter(events))
                seq.group, seq.tokens = job.salt, [*job.tokens, info.first_token]
                stored = self._join(job, info, seq, kv, len(job.tokens))
                del kv
            async for followed in self._follow(seq, reply, events, stored):
                yield followed
        finally:
            self._streams.discard(events)
            if seq is not None:
                self.batcher.cancel(seq)  # a no-op for a finished sequence; frees a cancelled one's slot
            elif pending:
                pending[0].cancel()  # left before joining (its KV stream stops; a lent slot goes back)
            self._admitted -= 1
            self._reserved -= len(job.tokens) + budget

    async def _resume(
        self,
        job: DecodeJob,
        info: Prefilled,
        kv_pending: PendingKV,
        reply: _Reply,
        budget: int,
        eos: tuple[int, ...],
        events: asyncio.Queue[Item],
        start: float,
    ) -> tuple[Sequence, asyncio.Future[None] | None]:
        """A migrated sequence joins with the KV the prefill node holds (prompt + output blocks
        written back); the output after it is replayed through decode steps; the text state (a
        split character, text held back for a stop string) is rebuilt from the output sent."""
        reply.replay(job.tokens[len(job.tokens) - job.generated :])
        kv = await self._unless_evicted(kv_pending.result())
        reply.received(time.perf_counter() - start)
        held, rest = kv.length, job.tokens[kv.length :]  # rest: >= 1 (the last token sent is never in it)
        sampler = Sampler(job.params, job.generated)
        seq = Sequence(job.request_id, rest[0], sampler, budget, eos, _emitter(events), group=job.salt)
        seq.tokens, seq.replay = [*job.tokens[: held + 1]], [*rest[1:]]
        stored = self._join(job, info, seq, kv, held)
        self.metrics.replayed.inc(len(rest))
        reply.replayed = len(rest)
        return seq, stored

    def _join(
        self, job: DecodeJob, info: Prefilled, seq: Sequence, kv: KVCache, held: int
    ) -> asyncio.Future[None] | None:
        """Into the batch, with its write-back if asked. -> set once the write-back is done."""
        self.metrics.kv_bytes.inc(info.kv_bytes)
        stored = None
        if job.keep_kv and info.block_size:
            stored = asyncio.get_running_loop().create_future()
            seq.keep = self._keep(job, info.block_size, held, stored)
        self.batcher.submit(seq, kv)
        return stored

    async def _follow(
        self, seq: Sequence, reply: _Reply, events: asyncio.Queue[Item], stored: asyncio.Future[None] | None
    ) -> AsyncIterator[Event]:
        """The batch's tokens for `seq` as events, to its end."""
        self.metrics.transfer.observe(reply.transfer_s)
        while True:
            item = await events.get()
            if item == ("end", "error"):
                raise KvmeshError("the decode step failed")  # INTERNAL; the node is NOT_SERVING
            if item == ("end", "evicted"):
                raise Unavailable(f"decode node {self.node_id} is draining and its drain time is over")
            if item[0] == "end":
                if stored is not None:  # the next turn, sent once Done is heard, finds the blocks stored
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(WRITE_BACK_WAIT_S):
                            await asyncio.shield(stored)
                for event in reply.end(str(item[1])):
                    yield event
                return
            token, stopped = reply.push(*cast(tuple[int, float], item))
            yield token
            if stopped:
                yield reply.done("stop")
                return

    async def _unless_evicted(self, work: Awaitable[T]) -> T:
        """`work`, unless the drain's time runs out first (then UNAVAILABLE: the proxy migrates)."""
        if self._evicted is None:  # not started on a server (tests drive the node directly): no drain
            return await work
        task: asyncio.Future[T] = asyncio.ensure_future(work)
        evicted: asyncio.Future[Any] = self._evicted
        try:
            await asyncio.wait([task, evicted], return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not task.done():
                task.cancel()
        if not task.done() or task.cancelled():
            raise Unavailable(f"decode node {self.node_id} is draining and its drain time is over")
        return task.result()

    def evict(self) -> None:
        """The drain's time is over: every request still here ends UNAVAILABLE, which the proxy
        migrates; their blocks go back to the store as they leave."""
        if self._evicted is not None and not self._evicted.done():
            self._evicted.set_result(None)
        for events in self._streams:
            events.put_nowait(("end", "evicted"))

    def _keep(self, job: DecodeJob, block: int, held: int, stored: asyncio.Future[None]) -> KeepKV:
        """A sequence's write-back, from the first block of its KV that the prefill node did not
        hold (`held` tokens came from it), a job per send; `stored` is set when the last is done."""

        decoded = self._decoded_kv

        def send(tokens: list[int], first: int, kv: KVCache | None) -> None:  # from the batcher thread
            if kv is not None:
                out = StoreJob(job.request_id, tokens, job.salt, first, kv, job.prefill_node, None, decoded)
            else:  # the end; an evicted sequence goes on elsewhere, from the blocks as they are
                last = decoded and not (self._evicted is not None and self._evicted.done())
                full = tokens[: first * block]
                out = StoreJob(job.request_id, full, job.salt, first, None, job.prefill_node, stored, decoded, last)
            self.writeback.offer(out)

        return KeepKV(held // block, block, send)

    def _prefill_job(self, job: DecodeJob, timeout_s: float | None) -> PrefillJob:
        timeout = timeout_s or self.config.prefill_timeout_s
        return PrefillJob(
            job.request_id,
            job.tokens,
            job.params,
            job.salt,
            job.wire_dtype,
            job.prefill_node,
            timeout,
            job.generated,
            job.first_timeout_s,
        )

    def start(self) -> None:
        """On the server's loop: the write-back task."""
        self._evicted = asyncio.get_running_loop().create_future()
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
        self.replayed = 0  # a resumption's output run through decode steps again
        self.transfer_s = 0.0
        self._received = 0.0  # perf_counter when the KV was in

    def push(self, token: int, logprob: float) -> tuple[Token, bool]:
        """-> the token's event, and whether a stop string ended the reply with it."""
        self.count += 1
        delta, stopped = self._stops.push(self._detok.push(token))
        return Token(token, delta, logprob), stopped

    def replay(self, output: Seq[int]) -> None:
        """A resumption: the output the client has, through the text state (nothing emitted or
        counted), so the next token's text continues it exactly."""
        for token in output:
            self._stops.push(self._detok.push(token))

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
            self.replayed,
        )
