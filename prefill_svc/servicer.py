"""The Prefill gRPC servicer: protobuf in and out, everything else in PrefillNode. Prefill yields
serialized PrefillResponses (KV chunks are framed by kv_transfer.fastwire with one copy of the
KV); `handlers` registers the service with that in mind."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from kv_transfer.codec import Assembler, Chunk, check_sizes
from kv_transfer.fastwire import encode_chunk_response
from kv_transfer.wire import layout_from_pb, layout_to_pb, wire_dtype
from kvmesh.errors import DataLoss
from kvmesh.params_pb import sampling_from_pb
from kvmesh.v1 import kv_pb2, prefill_pb2
from prefill_svc.node import PrefillNode

Context = grpc.aio.ServicerContext[object, object]
_EVENT_KINDS = {
    "snapshot": prefill_pb2.CacheEvent.SNAPSHOT,
    "snapshot_done": prefill_pb2.CacheEvent.SNAPSHOT,
    "stored": prefill_pb2.CacheEvent.STORED,
    "evicted": prefill_pb2.CacheEvent.EVICTED,
    "pinned": prefill_pb2.CacheEvent.PINNED,
}


class PrefillServicer:
    def __init__(self, node: PrefillNode) -> None:
        self.node = node

    async def Prefill(self, request: prefill_pb2.PrefillRequest, context: Context) -> AsyncIterator[bytes]:
        with self.node.serving():
            async for message in self._prefill(request, context):
                yield message

    async def _prefill(self, request: prefill_pb2.PrefillRequest, context: Context) -> AsyncIterator[bytes]:
        params = sampling_from_pb(request.sampling)
        tokens = list(request.tokens)
        outcome = await self.node.prefill(tokens, params, request.cache_salt, request.request_id, request.replay_tokens)
        dtype = wire_dtype(request.wire_dtype, self.node.runner.layout.dtype)
        layout, count, chunks = self.node.stream(outcome, dtype)
        header = kv_pb2.KVHeader(
            model_fingerprint=self.node.folder.fingerprint,
            layout=layout_to_pb(layout),
            cached_tokens=outcome.cached_tokens,
            first_token=outcome.first_token,
            first_logprob=outcome.first_logprob,
            chunk_count=count,
            total_bytes=layout.total_bytes,
            store_read_ms=outcome.store_read_s * 1000,
            compute_ms=outcome.compute_s * 1000,
            block_size=self.node.config.block_size if self.node.config.prefix_cache else 0,
        )
        yield prefill_pb2.PrefillResponse(header=header).SerializeToString()
        for chunk in chunks:
            yield encode_chunk_response(chunk)

    async def WatchCache(
        self, request: prefill_pb2.WatchCacheRequest, context: Context
    ) -> AsyncIterator[prefill_pb2.CacheEvent]:
        sequence = 0
        async for event in self.node.watch():
            sequence += 1
            yield prefill_pb2.CacheEvent(
                node_id=self.node.node_id,
                kind=_EVENT_KINDS[event.kind],
                block_keys=event.keys,
                snapshot_done=event.kind == "snapshot_done",
                sequence=sequence,
                block_size=self.node.config.block_size,
            )

    async def GetLoad(self, request: prefill_pb2.GetLoadRequest, context: Context) -> prefill_pb2.LoadReport:
        load = self.node.load()
        return prefill_pb2.LoadReport(
            node_id=self.node.node_id,
            queued_prefill_tokens=load.queued_prefill_tokens,
            running_requests=load.running_requests,
            store_bytes=load.store_bytes,
            store_blocks=load.store_blocks,
            pinned_blocks=load.pinned_blocks,
            store_writes_pending=load.store_writes_pending,
            lookup_tokens=load.lookup_tokens,
            hit_tokens=load.hit_tokens,
        )

    async def Pin(self, request: prefill_pb2.PinRequest, context: Context) -> prefill_pb2.PinResponse:
        tokens = await self.node.pin(list(request.tokens), request.cache_salt)
        return prefill_pb2.PinResponse(pinned_tokens=tokens, blocks=tokens // self.node.config.block_size)

    async def StoreKV(
        self, requests: AsyncIterator[prefill_pb2.StoreKVRequest], context: Context
    ) -> prefill_pb2.StoreKVResponse:
        """The header checked before any chunk is read; each chunk checked as it comes (DataLoss)."""
        it = aiter(requests)
        header = await _header(it)
        layout, tokens = layout_from_pb(header.kv.layout), list(header.tokens)
        self.node.check_store(header.kv.model_fingerprint, layout, tokens, header.first_block)
        kv = None
        if not (header.last and layout.tokens == 0 and header.kv.chunk_count == 0):  # else: just "it is over"
            check_sizes(layout, header.kv.total_bytes, header.kv.chunk_count)
            assembler = Assembler(layout, header.kv.chunk_count)
            async for request in it:
                if not request.HasField("chunk"):
                    raise DataLoss("a second header inside a StoreKV stream")
                c = request.chunk
                assembler.add(Chunk(c.index, c.offset, c.data, c.checksum))
            kv = assembler.finish()
        elif await anext(it, None) is not None:
            raise DataLoss("a StoreKV header without KV is followed by chunks")
        blocks = await self.node.store_kv(
            tokens, header.cache_salt, header.first_block, kv, header.decoded, header.last
        )
        return prefill_pb2.StoreKVResponse(blocks=blocks)


async def _header(requests: AsyncIterator[prefill_pb2.StoreKVRequest]) -> prefill_pb2.StoreKVHeader:
    first = await anext(requests, None)
    if first is None or not first.HasField("header"):
        raise DataLoss("a StoreKV stream starts with its header")
    return first.header


def handlers(servicer: PrefillServicer) -> grpc.GenericRpcHandler:
    """kvmesh.v1.Prefill's methods; Prefill's responses are already serialized."""
    p = prefill_pb2
    return grpc.method_handlers_generic_handler(
        "kvmesh.v1.Prefill",
        {
            "Prefill": grpc.unary_stream_rpc_method_handler(servicer.Prefill, p.PrefillRequest.FromString, bytes),
            "WatchCache": grpc.unary_stream_rpc_method_handler(
                servicer.WatchCache, p.WatchCacheRequest.FromString, p.CacheEvent.SerializeToString
            ),
            "GetLoad": grpc.unary_unary_rpc_method_handler(
                servicer.GetLoad, p.GetLoadRequest.FromString, p.LoadReport.SerializeToString
            ),
            "Pin": grpc.unary_unary_rpc_method_handler(
                servicer.Pin, p.PinRequest.FromString, p.PinResponse.SerializeToString
            ),
            "StoreKV": grpc.stream_unary_rpc_method_handler(
                servicer.StoreKV, p.StoreKVRequest.FromString, p.StoreKVResponse.SerializeToString
            ),
        },
    )
