"""A decode node's gRPC server: the Decode service on a ServiceHost (health, reflection, metrics)."""

from __future__ import annotations

import asyncio
import socket

from decode_svc.config import DecodeConfig
from decode_svc.node import DecodeNode
from decode_svc.servicer import DecodeServicer
from kvmesh.service import ServiceHost, serve_until_signal
from kvmesh.v1 import decode_pb2, decode_pb2_grpc

SERVICE = decode_pb2.DESCRIPTOR.services_by_name["Decode"].full_name


class DecodeServer:
    def __init__(self, config: DecodeConfig) -> None:
        self.config = config
        self.node = DecodeNode(config)
        self.host = ServiceHost((SERVICE,), config, self.node.metrics.registry)

    async def start(self) -> int:
        self.node.on_unhealthy = self.host.unhealthy_from_thread()
        self.node.node_id = self.config.node_id or f"{socket.gethostname()}:{self.host.port}"
        self.node.start()
        decode_pb2_grpc.add_DecodeServicer_to_server(DecodeServicer(self.node), self.host.server)
        await self.host.start()
        return self.host.port

    async def stop(self) -> None:
        """Drain: new requests refused, running sequences finish within drain_seconds; those still
        running then end UNAVAILABLE (the proxy migrates them), their blocks sent to the store."""
        self.node.drain()
        await self.host.stop(self.config.drain_seconds, self.node.idle, self.node.evict)
        await self.node.close()


async def serve(config: DecodeConfig, stop: asyncio.Event | None = None) -> None:
    server = DecodeServer(config)
    await serve_until_signal(server, lambda _: f"decode node {server.node.node_id}", stop)
