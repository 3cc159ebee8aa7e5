"""The Decode gRPC servicer: protobuf in and out, everything else in DecodeNode."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from decode_svc.node import DecodeJob, DecodeNode, Event, HeldBack, Ready, Token
from kvmesh.params_pb import params_from_pb
from kvmesh.v1 import decode_pb2, decode_pb2_grpc, stream_pb2

Context = grpc.aio.ServicerContext[object, object]


def event_to_pb(event: Event) -> decode_pb2.DecodeEvent:
    if isinstance(event, Ready):
        prefilled = decode_pb2.Prefilled(cached_tokens=event.cached_tokens, replayed_tokens=event.replayed_tokens)
        return decode_pb2.DecodeEvent(prefilled=prefilled)
    if isinstance(event, HeldBack):
        return decode_pb2.DecodeEvent(text=stream_pb2.TextEvent(text=event.text))
    if isinstance(event, Token):
        return decode_pb2.DecodeEvent(
            token=stream_pb2.TokenEvent(token_id=event.token_id, text=event.text, logprob=event.logprob)
        )
    usage = stream_pb2.Usage(
        prompt_tokens=event.prompt_tokens, cached_tokens=event.cached_tokens, completion_tokens=event.completion_tokens
    )
    timings = stream_pb2.Timings(
        ttft_ms=event.ttft_ms,
        kv_transfer_ms=event.kv_transfer_ms,
        kv_bytes=event.kv_bytes,
        decode_ms=event.decode_ms,
        prefill_compute_ms=event.prefill_compute_ms,
        store_read_ms=event.store_read_ms,
        replayed_tokens=event.replayed_tokens,
    )
    return decode_pb2.DecodeEvent(
        finished=stream_pb2.Finished(finish_reason=event.reason, usage=usage, timings=timings)
    )


class DecodeServicer(decode_pb2_grpc.DecodeServicer):
    def __init__(self, node: DecodeNode) -> None:
        self.node = node

    async def Decode(
        self, request: decode_pb2.DecodeRequest, context: Context
    ) -> AsyncIterator[decode_pb2.DecodeEvent]:
        job = DecodeJob(
            request.request_id,
            list(request.tokens),
            params_from_pb(request.params),
            request.prefill_node,
            request.cache_salt,
            request.wire_dtype,
            request.keep_kv,
            request.generated,
            request.first_token_timeout_ms / 1000,
        )
        async for event in self.node.decode(job, context.time_remaining()):
            yield event_to_pb(event)

    async def GetLoad(self, request: decode_pb2.GetDecodeLoadRequest, context: Context) -> decode_pb2.DecodeLoad:
        load = self.node.load()
        return decode_pb2.DecodeLoad(
            node_id=self.node.node_id,
            running_sequences=load.running,
            kv_tokens_held=load.kv_tokens_held,
            tokens_reserved=load.tokens_reserved,
            waiting=load.waiting,
            free_slots=load.free_slots,
        )
