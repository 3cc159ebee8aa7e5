"""A relay in front of a real prefill node that damages its KV stream on the way, as a bad link
or a dying node would: flip a byte of chunk k, drop chunk k, or (as a process) die after chunk k;
or that lies in the header, as a hostile peer would (`tokens:N`, `heads:N`, `fingerprint:0`,
`first:ID`, `huge:0` a layout of 2^31 tokens with the bytes to match).

  python -m tests.helpers.relay UPSTREAM die:K    (prints its port, exits hard after K chunks)

Every other call (health, load, cache watch, pin) is passed on as it is, metadata included, so
a proxy can take the relay for the prefill node itself.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator

import grpc

from kv_transfer.wire import PREFILL_METHOD
from kvmesh.v1 import prefill_pb2

_LIES = {"tokens", "heads", "fingerprint", "first", "huge"}


def _lie(raw: bytes, kind: str, value: int) -> bytes:
    message = prefill_pb2.PrefillResponse.FromString(raw)
    h = message.header
    if kind == "tokens":
        h.layout.tokens = value
    elif kind == "heads":
        h.layout.kv_heads += value
    elif kind == "fingerprint":
        h.model_fingerprint = "f" * 32
    elif kind == "first":
        h.first_token = value
    else:  # huge: every size consistent with 2^31 tokens
        h.layout.tokens = 2**31
        h.total_bytes = h.total_bytes // max(1, h.layout.tokens) * 2**31
    return message.SerializeToString()


class Relay:
    def __init__(self, upstream: str, fault: str) -> None:
        self.upstream, self.fault = upstream, fault
        self.kind, self.at = fault.split(":")[0], int(fault.split(":")[1])
        self.server = grpc.aio.server()
        self.port = 0

    async def _prefill(self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> AsyncIterator[bytes]:
        async with grpc.aio.insecure_channel(self.upstream) as channel:
            call = channel.unary_stream(PREFILL_METHOD, request_serializer=None, response_deserializer=None)
            n = -1  # the header is message 0; chunks are 1, 2, ...
            async for raw in call(request, metadata=context.invocation_metadata()):
                n += 1
                if n == 0 and self.kind in _LIES:
                    raw = _lie(raw, self.kind, self.at)
                if n == self.at + 1 and self.kind == "drop":
                    continue
                if n == self.at + 1 and self.kind == "flip":
                    damaged = bytearray(raw)
                    damaged[len(damaged) // 2] ^= 0x01
                    raw = bytes(damaged)
                yield raw
                if n == self.at and self.kind == "die":
                    await asyncio.sleep(0.05)
                    os._exit(1)

    async def start(self) -> int:
        handler = grpc.method_handlers_generic_handler(
            "kvmesh.v1.Prefill", {"Prefill": grpc.unary_stream_rpc_method_handler(self._prefill)}
        )
        self.channel = grpc.aio.insecure_channel(self.upstream)
        self.server.add_generic_rpc_handlers((handler, _PassOn(self.channel)))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return self.port

    async def stop(self) -> None:
        await self.server.stop(0)


_STREAMS = {"/grpc.health.v1.Health/Watch", "/kvmesh.v1.Prefill/WatchCache"}


class _PassOn(grpc.GenericRpcHandler):
    """Any other unary or server-streaming method, bytes in and out, to the upstream node."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = details.method

        async def unary(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
            call = self.channel.unary_unary(method, request_serializer=None, response_deserializer=None)
            return await call(request, metadata=context.invocation_metadata())  # type: ignore[no-any-return]

        async def stream(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> AsyncIterator[bytes]:
            call = self.channel.unary_stream(method, request_serializer=None, response_deserializer=None)
            async for raw in call(request, metadata=context.invocation_metadata()):
                yield raw

        if method in _STREAMS:
            return grpc.unary_stream_rpc_method_handler(stream)
        return grpc.unary_unary_rpc_method_handler(unary)


async def _main(upstream: str, fault: str) -> None:
    relay = Relay(upstream, fault)
    print(await relay.start(), flush=True)
    await relay.server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(_main(sys.argv[1], sys.argv[2]))
