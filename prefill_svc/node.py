"""A prefill node: the engine behind admission control, a single model thread, cache events and
metrics. Asyncio-facing; no protobuf here (the servicer converts)."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import cast

import numpy as np
from prometheus_client import CollectorRegistry

from kv_transfer.codec import Chunk, Layout, check_same_model, chunk_count, encode, layout_of
from kvmesh.errors import DataLoss, InvalidArgument, Unavailable
from kvmesh.model.folder import ModelFolder
from kvmesh.model.kv import KVCache
from kvmesh.model.lease import SlotLease
from kvmesh.model.prepare import default_model_dir, kvmesh_home
from kvmesh.model.runner import ModelRunner, Provider, RunnerConfig
from kvmesh.model.tokenizer import ChatTokenizer
from kvmesh.model.turns import Turns
from kvmesh.sampling import SamplingParams
from prefill_svc.config import PrefillConfig
from prefill_svc.engine import PrefillEngine, PrefillOutcome, Prompt
from prefill_svc.events import CacheEvent, CacheEvents
from prefill_svc.metrics import PrefillMetrics
from prefill_svc.queue import FairQueue, Together
from prefill_svc.store import PrefixStore, StoreConfig, StoreWriter

log = logging.getLogger(__name__)
SNAPSHOT_BATCH = 4096
# A finished reply's blocks are recomputed this many tokens at a time, between prompts: one that
# arrives meanwhile waits for one piece (~0.2 s on 2 cores after a 2,500-token past), not all.
RECOMPUTE_TOKENS = 256
# ... and only this long after the sequence ended: a next turn sent at once (a program's, not a
# person's) computes those blocks itself, ahead of the recompute instead of waiting behind it (at
# once, bench/multiturn.py's next turns missed their first-token deadline and were retried).
RECOMPUTE_AFTER_S = 1.0


@dataclass(frozen=True)
class Load:
    queued_prefill_tokens: int
    running_requests: int
    store_bytes: int
    store_blocks: int
    pinned_blocks: int
    store_writes_pending: int
    lookup_tokens: int
    hit_tokens: int


class PrefillNode:
    """`runner` given: a colocated worker's, shared with its decode side; `registry`: its metrics."""

    def __init__(
        self,
        config: PrefillConfig,
        runner: ModelRunner | None = None,
        registry: CollectorRegistry | None = None,
        turns: Turns | None = None,
    ) -> None:
        """turns: a colocated worker's (its decode steps and config.prefill_chunk_tokens chunks take
        turns on the shared model), see PrefillEngine."""
        self.config = config
        self._turns = turns
        self.on_unhealthy: Callable[[], None] = lambda: None  # the server's: health NOT_SERVING
        self.folder = runner.folder if runner else ModelFolder.load(config.model or default_model_dir("int4"))
        provider = cast(Provider, config.provider)
        self.runner = runner or ModelRunner(
            # no decode graph: a prefill node runs no decode step (and so holds no second session)
            self.folder,
            RunnerConfig(threads=config.threads, provider=provider, stop_spinning=True, decode_numerics="exact"),
        )
        store_config = StoreConfig(
            config.store or kvmesh_home() / "prefix-store", config.store_budget_bytes, config.block_size
        )
        self.store = PrefixStore(store_config, self.folder.fingerprint, self.runner.layout)
        # one model run at a time, the tenants' jobs taking turns
        self.queue = FairQueue(config.max_queued_tokens, "prefill-model", self._pushed_out)
        self._together: Together | None = None  # start(): prompts waiting at once, prefilled in one run
        if not config.prefill_chunk_tokens and config.prefill_together_tokens:
            self.runner.load_group()
        self.metrics = PrefillMetrics(self.store.stats, lambda: self.queue.tokens, registry)
        self.events: CacheEvents | None = None
        self.writer: StoreWriter | None = None
        self.engine: PrefillEngine | None = None
        self.node_id = config.node_id
        self._serving = 0
        self._later: set[asyncio.TimerHandle] = set()  # recomputes not yet queued
        self.draining = False  # new prefills refused (UNAVAILABLE: the caller retries elsewhere)
        self._lookup = self._hits = 0

    async def start(self, node_id: str) -> None:
        """Start the writer (its events reach this loop) and prefill the pinned system prompts."""
        self.node_id = self.node_id or node_id
        self.events = CacheEvents(asyncio.get_running_loop())
        self.writer = StoreWriter(self.store, self._on_store_event, self.idle, on_fault=self._fault)
        self.engine = PrefillEngine(
            self.runner,
            self.store,
            self.writer,
            self.folder.fingerprint,
            self.config.prefix_cache,
            self._turns,
            self.config.prefill_chunk_tokens,
            reuse_decoded=self.config.reply_kv == "decoded",
        )
        if self.engine.can_group and self.config.prefill_together_tokens:
            limits = self.runner.group_segments, self.config.prefill_together_tokens
            self._together = Together(self.engine.prefill_together, *limits)
        tok = ChatTokenizer(self.folder)
        for text in self.config.pin_system:
            prompt = tok.encode_chat([{"role": "system", "content": text}], add_generation_prompt=False)
            if len(prompt) < self.config.block_size:
                log.warning("system prompt %r is shorter than one block: nothing to pin", text[:40])
                continue
            log.info("pinned %d tokens of a system prompt", await self.pin(prompt, b""))

    def _fault(self, error: BaseException) -> None:
        """A background thread failed unexpectedly: counted, and the node stops taking requests."""
        self.metrics.faults.labels(type(error).__name__).inc()
        self.on_unhealthy()

    def _pushed_out(self) -> None:
        self.metrics.pushed_out.inc()

    def _on_store_event(self, kind: str, keys: list[bytes]) -> None:
        if kind == "evicted":
            self.metrics.evictions.inc(len(keys))
        if self.events is not None:
            self.events.publish_threadsafe(kind, keys)

    async def prefill(
        self,
        tokens: Sequence[int],
        params: SamplingParams,
        salt: bytes,
        request_id: str = "",
        replay: int = 0,
        into: SlotLease | None = None,
    ) -> PrefillOutcome:
        """replay > 0: a migrated sequence's resumption (PrefillEngine.resume); into: a decode slot
        of this process to prefill in place (a colocated worker's)."""
        assert self.engine is not None, "start() first"
        if self.draining:
            raise Unavailable("this prefill node is draining")
        # The queue counts tokens to compute, as the proxy's routing does (cached ones are nearly free).
        keys = self.engine.lookup_keys(tokens, salt)  # hashed once: for the queue here and the prefill
        work = self.engine.uncached_tokens(tokens, salt, keys) if tokens else 0
        start = time.perf_counter()
        outcome: PrefillOutcome
        # Out of place, a one-token tail runs alone: the one-row kernel (~20 ms) costs less than
        # its share of a run together plus its past copied twice more (8 warm joins of 512-token
        # prompts through a prefill node: first tokens at 978 ms together against 416 alone)
        if not replay and self._together is not None and (into is not None or work > 1):
            outcome = await self.queue.run_together(salt, work, Prompt(tokens, params, keys, into), self._together)
            if outcome.together > 1:
                self.metrics.together.inc()
        else:
            run = functools.partial(self.engine.prefill, tokens, params, salt, keys, replay, into)
            outcome = await self.queue.run(salt, work, run)
        self.metrics.latency.observe(time.perf_counter() - start)
        self.metrics.lookup_tokens.inc(len(tokens))
        self.metrics.hit_tokens.inc(outcome.cached_tokens)
        self._lookup += len(tokens)
        self._hits += outcome.cached_tokens
        self.metrics.store_read.observe(outcome.store_read_s)
        log.info(
            "prefill",
            extra={
                "request_id": request_id,
                "prompt_tokens": len(tokens),
                "replay_tokens": replay,
                "cached_tokens": outcome.cached_tokens,
                "compute_ms": round(outcome.compute_s * 1000, 1),
                "together": outcome.together,
            },
        )
        if outcome.bad_blocks:
            self.metrics.checksum_failures.inc(outcome.bad_blocks)
            log.warning(
                "stored KV failed its checksum: dropped with the blocks below it, recomputed",
                extra={"request_id": request_id, "bad_blocks": outcome.bad_blocks},
            )
        return outcome

    def stream(self, outcome: PrefillOutcome, wire_dtype: np.dtype) -> tuple[Layout, int, Iterator[Chunk]]:
        """The KV as (layout, chunk count, chunks made one at a time as they are sent)."""
        layout = layout_of(outcome.kv, wire_dtype)

        def chunks() -> Iterator[Chunk]:
            for chunk in encode(outcome.kv, wire_dtype, self.config.chunk_bytes):
                self.metrics.kv_bytes_sent.inc(memoryview(chunk.data).nbytes)
                yield chunk

        return layout, chunk_count(layout, self.config.chunk_bytes), chunks()

    @contextmanager
    def serving(self) -> Iterator[None]:
        """Around a Prefill call, from before its prefill to its last chunk: the store writer
        waits for quiet, and the moment between the model's end and the stream's start is not
        quiet (a write there took the cores from the KV stream: 70 ms became 150-300)."""
        self._serving += 1
        try:
            yield
        finally:
            self._serving -= 1

    def check_store(self, fingerprint: str, layout: Layout, tokens: Sequence[int], first_block: int) -> None:
        """A peer's StoreKV header, before any chunk is read: KV of this model, exactly the full
        blocks of `tokens` from `first_block`, tokens within the vocabulary and the context."""
        check_same_model(fingerprint, layout, self.folder.fingerprint, self.runner.layout)
        bs = self.config.block_size
        if len(tokens) >= self.runner.max_context:
            raise InvalidArgument(f"{len(tokens)} tokens do not fit the context of {self.runner.max_context}")
        self.runner.check_tokens(tokens)
        blocks = len(tokens) // bs
        if not 0 <= first_block <= blocks or layout.tokens != (blocks - first_block) * bs:
            raise DataLoss(
                f"KV of {layout.tokens} tokens from block {first_block} is not the full blocks of {len(tokens)} tokens"
            )

    async def store_kv(
        self,
        tokens: Sequence[int],
        salt: bytes,
        first_block: int,
        kv: KVCache | None,
        decoded: bool = False,
        last: bool = False,
    ) -> int:
        """KV a decode node made (check_store first): queued for the store. `decoded`: made with
        other numerics than this prefill's (int8 activations); `last`: the sequence is over, so its
        decoded blocks are recomputed exactly in the background. -> blocks queued."""
        assert self.engine is not None, "start() first"
        blocks = self.engine.store_kv(tokens, salt, first_block, kv, decoded)
        self.metrics.written_back.inc(blocks)
        if last and decoded and self.config.prefix_cache and self.config.reply_kv == "exact":
            engine, full = self.engine, list(tokens[: len(tokens) // self.config.block_size * self.config.block_size])

            def piece() -> bool:
                start = time.perf_counter()
                done = engine.recompute(full, salt, RECOMPUTE_TOKENS)
                if done:
                    self.metrics.recomputed.inc(done)
                    ms = round((time.perf_counter() - start) * 1000, 1)
                    log.info("recomputed", extra={"blocks": done, "sequence_tokens": len(full), "compute_ms": ms})
                return done > 0

            def queue() -> None:
                self._later.discard(timer)
                if not self.queue.background(piece):
                    log.warning("recompute backlog full: a reply's blocks stay as its decode node made them")

            timer = asyncio.get_running_loop().call_later(RECOMPUTE_AFTER_S, queue)
            self._later.add(timer)
        return blocks

    def settled(self) -> bool:
        """Nothing left to run, recompute or write (what a test waits for between turns)."""
        return not self._later and self.queue.idle and (self.writer is None or self.writer.pending == 0)

    def idle(self) -> bool:
        """No prefill running and no KV stream in progress (what a drain waits for)."""
        return not (self.queue.running or self._serving)

    async def pin(self, tokens: Sequence[int], salt: bytes) -> int:
        assert self.engine is not None, "start() first"
        return await self.queue.run(salt, 0, functools.partial(self.engine.pin, tokens, salt))

    def load(self) -> Load:
        total, blocks, pinned = self.store.stats()
        pending = self.writer.pending if self.writer else 0
        return Load(self.queue.tokens, self.queue.running, total, blocks, pinned, pending, self._lookup, self._hits)

    async def watch(self) -> AsyncIterator[CacheEvent]:
        """Snapshot batches ("snapshot", last one "snapshot_done"), then live events until the
        watcher lags (then the stream ends and the watcher resyncs)."""
        assert self.events is not None, "start() first"
        with self.events.subscribe() as live:
            keys = list(self.store.keys())
            for i in range(0, max(len(keys), 1), SNAPSHOT_BATCH):
                done = i + SNAPSHOT_BATCH >= len(keys)
                yield CacheEvent("snapshot_done" if done else "snapshot", keys[i : i + SNAPSHOT_BATCH])
            while (event := await live.get()).kind != "lagged":
                yield event

    async def close(self) -> None:
        for timer in self._later:
            timer.cancel()
        self.queue.close()
        if self.writer is not None:
            self.writer.close()
        self.store.close()
