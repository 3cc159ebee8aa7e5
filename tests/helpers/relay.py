"""A relay in front of a real prefill node that damages its KV stream on the way, as a bad link
or a dying node would: flip a byte of chunk k, drop chunk k, or (as a process) die after chunk k.

  python -m tests.helpers.relay UPSTREAM die:K    (prints its port, exits hard after K chunks)
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator

import grpc

from kv_transfer.wire import PREFILL_METHOD


class Relay:
    def __init__(self, upstream: str, fault: str) -> None:
        self.upstream, self.fault = upstream, fault
        self.kind, self.at = fault.split(":")[0], int(fault.split(":")[1])
        self.server = grpc.aio.server()
        self.port = 0

    async def _prefill(self, request: bytes, context: object) -> AsyncIterator[bytes]:
        async with grpc.aio.insecure_channel(self.upstream) as channel:
            call = channel.unary_stream(PREFILL_METHOD, request_serializer=None, response_deserializer=None)
            n = -1  # the header is message 0; chunks are 1, 2, ...
            async for raw in call(request):
                n += 1
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
        self.server.add_generic_rpc_handlers((handler,))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return self.port

    async def stop(self) -> None:
        await self.server.stop(0)


async def _main(upstream: str, fault: str) -> None:
    relay = Relay(upstream, fault)
    print(await relay.start(), flush=True)
    await relay.server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(_main(sys.argv[1], sys.argv[2]))
