"""Where a decode node gets a prompt's KV and first token: a `Source`. Here the remote one, a
prefill node over gRPC; a colocated worker's in-process one is worker/source.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import grpc

from kv_transfer.codec import Layout, check_same_model, check_sizes, encode, layout_of
from kv_transfer.wire import layout_from_pb, layout_to_pb, prefill_method, pull, read_header
from kvmesh.aio import PER_TOKEN_S, Stalled, within
from kvmesh.errors import DataLoss, Upstream
from kvmesh.model.kv import KVCache, KVLayout
from kvmesh.params_pb import sampling_to_pb
from kvmesh.rpc import cluster_channel, upstream
from kvmesh.sampling import SamplingParams
from kvmesh.service import GRPC_OPTIONS
from kvmesh.v1 import kv_pb2, prefill_pb2, prefill_pb2_grpc

STORE_TIMEOUT_S = 30.0  # a write-back's whole call (at most a context's KV: 377 MB of SmolLM2)


@dataclass(frozen=True)
class Prefilled:
    """What arrives with the first token, before the KV."""

    first_token: int
    first_logprob: float
    cached_tokens: int
    compute_ms: float
    store_read_ms: float
    kv_bytes: int
    block_size: int  # of the prefill node's store (0: none): a write-back sends its full blocks


class PendingKV:
    """The KV behind a first token: result() receives it, cancel() gives it up."""

    def __init__(self, receive: Callable[[], Awaitable[KVCache]], cancel: Callable[[], object]) -> None:
        self._receive, self._cancel = receive, cancel

    async def result(self) -> KVCache:
        return await self._receive()

    def cancel(self) -> None:
        self._cancel()


@dataclass(frozen=True)
class PrefillJob:
    request_id: str
    tokens: Sequence[int]
    params: SamplingParams
    salt: bytes
    wire_dtype: int
    prefill_node: str
    timeout_s: float
    replay: int = 0  # a migrated sequence: the last `replay` tokens are output (PrefillRequest.replay_tokens)
    first_s: float = 0.0  # the caller's wait for the first answer (its view of the queue), if longer than ours


@dataclass(frozen=True)
class StoreJob:
    """A sequence's new full blocks, for the prefix store of the node that prefilled it."""

    request_id: str
    tokens: list[int]  # from the sequence's first, to the end of the last full block sent
    salt: bytes
    first_block: int  # kv starts at this block
    kv: KVCache | None  # None: the sequence's end (no KV; `done` is set once it is reached)
    prefill_node: str
    done: asyncio.Future[None] | None = None  # set when stored, dropped or failed (on the loop)
    decoded: bool = False  # made by decode steps with other numerics than the prefill's
    last: bool = False  # the end, told to the prefill node: it recomputes the decoded blocks exactly


class Source(Protocol):
    async def start(self, job: PrefillJob) -> tuple[Prefilled, PendingKV]:
        """The first token and what it took at once; the KV behind it pending."""
        ...

    async def store(self, job: StoreJob) -> int:
        """Hand KV back to the store it came from. -> blocks it took."""
        ...

    async def close(self) -> None: ...


class RemotePrefill:
    """Calls Prefill on the node a request names; one channel per node, kept."""

    def __init__(self, fingerprint: str, layout: KVLayout, vocab: int, token: str = "", stall_s: float = 5.0) -> None:
        """layout, vocab: this node's model's, which a prefill node's header must match; token: the
        cluster's, on every call; stall_s: a prefill node silent this long (the header: plus 5 ms a
        prompt token) is taken as frozen, UNAVAILABLE."""
        self.fingerprint, self.layout, self.vocab, self._token = fingerprint, layout, vocab, token
        self.stall_s = stall_s
        self._channels: dict[str, grpc.aio.Channel] = {}

    def _channel(self, node: str) -> grpc.aio.Channel:
        channel = self._channels.get(node)
        if channel is None:
            channel = self._channels[node] = cluster_channel(node, self._token, GRPC_OPTIONS)
        return channel

    async def start(self, job: PrefillJob) -> tuple[Prefilled, PendingKV]:
        if not job.prefill_node:
            raise Upstream("INVALID_ARGUMENT", "the request names no prefill node")
        channel = self._channel(job.prefill_node)
        request = prefill_pb2.PrefillRequest(
            request_id=job.request_id,
            tokens=job.tokens,
            sampling=sampling_to_pb(job.params),
            cache_salt=job.salt,
            wire_dtype=kv_pb2.KVDtype.ValueType(job.wire_dtype),
            replay_tokens=job.replay,
        )
        call = prefill_method(channel)(request, timeout=job.timeout_s)
        # the first answer's deadline: this prompt's work, or the proxy's wait if longer (it counts
        # the node's queue: 16 requests at once left one here waiting > 5.7 s, taken as a stall)
        first_s = max(self.stall_s + PER_TOKEN_S * len(job.tokens), job.first_s)
        it: AsyncIterator[bytes] = within(call, first_s, self.stall_s)
        try:
            header = await read_header(it)
        except (grpc.aio.AioRpcError, Stalled) as e:
            call.cancel()
            raise upstream(e, "prefill node " + job.prefill_node) from e
        try:
            self._check(header, len(job.tokens), job.replay)
        except DataLoss as e:
            call.cancel()
            raise DataLoss(f"prefill node {job.prefill_node}: {e}") from e
        info = Prefilled(
            header.first_token,
            header.first_logprob,
            header.cached_tokens,
            header.compute_ms,
            header.store_read_ms,
            header.total_bytes,
            header.block_size,
        )
        return info, PendingKV(lambda: self._receive(header, it, call, job.prefill_node), call.cancel)

    def _check(self, header: kv_pb2.KVHeader, sent: int, replay: int = 0) -> None:
        """A peer's header is untrusted: it must describe this prompt's KV for this very model, in
        sizes that follow from that, before anything is allocated or decoded (else DATA_LOSS). A
        resumption's KV covers at least the prompt and not the last token."""
        layout = layout_from_pb(header.layout)  # DataLoss for an unknown dtype
        check_same_model(header.model_fingerprint, layout, self.fingerprint, self.layout)
        low, high = (sent - replay, sent - 1) if replay else (sent, sent)
        if not low <= layout.tokens <= high or header.cached_tokens > layout.tokens:
            raise DataLoss(
                f"KV of {layout.tokens} tokens ({header.cached_tokens} cached) for {sent} tokens sent, "
                f"{replay} of them to replay"
            )
        if self.vocab and not 0 <= header.first_token < self.vocab:
            raise DataLoss(f"first token {header.first_token} is outside the vocabulary")
        check_sizes(layout, header.total_bytes, header.chunk_count)

    async def _receive(self, header: kv_pb2.KVHeader, it: AsyncIterator[bytes], call: Any, node: str) -> KVCache:
        try:
            return (await pull(it, header=header)).kv
        except (grpc.aio.AioRpcError, Stalled) as e:
            raise upstream(e, "prefill node " + node) from e
        finally:
            call.cancel()  # a no-op once the stream ended; stops the node's work when we gave up

    async def store(self, job: StoreJob) -> int:
        """StoreKV on the node that prefilled the sequence: a header, the KV's chunks (views; one copy
        each into its message); a last job without KV: the header alone."""
        lay = self.layout
        layout = (
            layout_of(job.kv, lay.dtype) if job.kv else Layout(lay.layers, lay.kv_heads, lay.head_dim, 0, lay.dtype)
        )
        chunks = list(encode(job.kv, lay.dtype)) if job.kv else []
        header = prefill_pb2.StoreKVHeader(
            request_id=job.request_id,
            tokens=job.tokens,
            cache_salt=job.salt,
            first_block=job.first_block,
            decoded=job.decoded,
            last=job.last,
            kv=kv_pb2.KVHeader(
                model_fingerprint=self.fingerprint,
                layout=layout_to_pb(layout),
                chunk_count=len(chunks),
                total_bytes=layout.total_bytes,
            ),
        )

        async def requests() -> AsyncIterator[prefill_pb2.StoreKVRequest]:
            yield prefill_pb2.StoreKVRequest(header=header)
            for c in chunks:
                chunk = kv_pb2.KVChunk(index=c.index, offset=c.offset, data=bytes(c.data), checksum=c.checksum)
                yield prefill_pb2.StoreKVRequest(chunk=chunk)

        stub = prefill_pb2_grpc.PrefillStub(self._channel(job.prefill_node))
        try:
            reply = await stub.StoreKV(requests(), timeout=STORE_TIMEOUT_S)
        except grpc.aio.AioRpcError as e:
            raise upstream(e, "prefill node " + job.prefill_node) from e
        return int(reply.blocks)

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
