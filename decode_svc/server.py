"""A decode node's (or colocated worker's: Decode and Prefill) gRPC server on a ServiceHost."""

from __future__ import annotations

import asyncio
import socket

from decode_svc.config import DecodeConfig
from decode_svc.node import DecodeNode
from decode_svc.servicer import DecodeServicer
from kvmesh.service import ServiceHost, serve_until_signal
from kvmesh.v1 import decode_pb2, decode_pb2_grpc
from prefill_svc.server import SERVICE as PREFILL_SERVICE
from prefill_svc.servicer import PrefillServicer, handlers

SERVICE = decode_pb2.DESCRIPTOR.services_by_name["Decode"].full_name


class DecodeServer:
    def __init__(self, config: DecodeConfig) -> None:
        self.config = config
        self.node = DecodeNode(config)
        services = (SERVICE, PREFILL_SERVICE) if config.colocated else (SERVICE,)
        self.host = ServiceHost(services, config, self.node.metrics.registry)

    async def start(self) -> int:
        self.node.on_unhealthy = self.host.unhealthy_from_thread()
        self.node.node_id = self.config.node_id or f"{socket.gethostname()}:{self.host.port}"
        decode_pb2_grpc.add_DecodeServicer_to_server(DecodeServicer(self.node), self.host.server)
        if self.node.prefill_node is not None:  # colocated: the Prefill service too, on the same port
            self.node.prefill_node.on_unhealthy = self.node.on_unhealthy
            await self.node.prefill_node.start(self.node.node_id)
            self.host.server.add_generic_rpc_handlers((handlers(PrefillServicer(self.node.prefill_node)),))
        await self.host.start()
        return self.host.port

    async def stop(self) -> None:
        """Drain: new requests refused, running sequences finish within drain_seconds."""
        self.node.drain()
        await self.host.stop(self.config.drain_seconds)
        await self.node.close()


async def serve(config: DecodeConfig, stop: asyncio.Event | None = None) -> None:
    server = DecodeServer(config)
    kind = "colocated worker" if config.colocated else "decode node"
    await serve_until_signal(server, lambda _: f"{kind} {server.node.node_id}", stop)
