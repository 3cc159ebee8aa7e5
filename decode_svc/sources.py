"""Where a decode node gets a prompt's KV and first token: a remote prefill node over gRPC, or
(colocated worker) a prefill engine in this very process."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from kv_transfer.wire import prefill_method, pull, read_header
from kvmesh.errors import ModelError, Upstream
from kvmesh.model.runner import KVCache
from kvmesh.params_pb import sampling_to_pb
from kvmesh.rpc import upstream
from kvmesh.sampling import SamplingParams
from kvmesh.service import GRPC_OPTIONS
from kvmesh.v1 import kv_pb2, prefill_pb2
from prefill_svc.node import PrefillNode


@dataclass(frozen=True)
class Prefilled:
    """What arrives with the first token, before the KV."""

    first_token: int
    first_logprob: float
    cached_tokens: int
    compute_ms: float
    store_read_ms: float
    kv_bytes: int


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


class RemotePrefill:
    """Calls Prefill on the node a request names; one channel per node, kept."""

    def __init__(self, fingerprint: str) -> None:
        self.fingerprint = fingerprint
        self._channels: dict[str, grpc.aio.Channel] = {}

    async def start(self, job: PrefillJob) -> tuple[Prefilled, PendingKV]:
        if not job.prefill_node:
            raise Upstream("INVALID_ARGUMENT", "the request names no prefill node")
        channel = self._channels.get(job.prefill_node)
        if channel is None:
            channel = self._channels[job.prefill_node] = grpc.aio.insecure_channel(
                job.prefill_node, options=GRPC_OPTIONS
            )
        request = prefill_pb2.PrefillRequest(
            request_id=job.request_id,
            tokens=job.tokens,
            sampling=sampling_to_pb(job.params),
            cache_salt=job.salt,
            wire_dtype=kv_pb2.KVDtype.ValueType(job.wire_dtype),
        )
        call = prefill_method(channel)(request, timeout=job.timeout_s)
        it: AsyncIterator[bytes] = aiter(call)
        try:
            header = await read_header(it)
        except grpc.aio.AioRpcError as e:
            raise upstream(e, "prefill node " + job.prefill_node) from e
        if header.model_fingerprint != self.fingerprint:
            call.cancel()
            raise ModelError(f"prefill node {job.prefill_node} serves another model ({header.model_fingerprint})")
        info = Prefilled(
            header.first_token,
            header.first_logprob,
            header.cached_tokens,
            header.compute_ms,
            header.store_read_ms,
            header.total_bytes,
        )
        return info, PendingKV(lambda: self._receive(header, it, call, job.prefill_node), call.cancel)

    async def _receive(self, header: kv_pb2.KVHeader, it: AsyncIterator[bytes], call: Any, node: str) -> KVCache:
        try:
            return (await pull(it, header=header)).kv
        except grpc.aio.AioRpcError as e:
            raise upstream(e, "prefill node " + node) from e
        finally:
            call.cancel()  # a no-op once the stream ended; stops the node's work when we gave up

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()


class LocalPrefill:
    """The colocated worker's: a prefill node in this process (its store, queue, cache events and
    Prefill service as a prefill node's); the KV is handed over as is."""

    def __init__(self, node: PrefillNode) -> None:
        self.node = node

    async def start(self, job: PrefillJob) -> tuple[Prefilled, PendingKV]:
        outcome = await self.node.prefill(job.tokens, job.params, job.salt, job.request_id)
        info = Prefilled(
            outcome.first_token,
            outcome.first_logprob,
            outcome.cached_tokens,
            outcome.compute_s * 1000,
            outcome.store_read_s * 1000,
            0,
        )

        async def handed_over() -> KVCache:
            return outcome.kv

        return info, PendingKV(handed_over, lambda: None)

    async def close(self) -> None:
        await self.node.close()
