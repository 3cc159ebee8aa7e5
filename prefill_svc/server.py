"""A prefill node's gRPC server: the Prefill service on a ServiceHost (health, reflection, metrics)."""

from __future__ import annotations

import asyncio
import socket

from kvmesh.service import ServiceHost, serve_until_signal
from kvmesh.v1 import prefill_pb2
from prefill_svc.config import PrefillConfig
from prefill_svc.node import PrefillNode
from prefill_svc.servicer import PrefillServicer, handlers

SERVICE = prefill_pb2.DESCRIPTOR.services_by_name["Prefill"].full_name


class PrefillServer:
    def __init__(self, config: PrefillConfig) -> None:
        self.config = config
        self.node = PrefillNode(config)
        self.host = ServiceHost((SERVICE,), config, self.node.metrics.registry)

    async def start(self) -> int:
        self.node.on_unhealthy = self.host.unhealthy_from_thread()
        await self.node.start(self.config.node_id or f"{socket.gethostname()}:{self.host.port}")
        self.host.server.add_generic_rpc_handlers((handlers(PrefillServicer(self.node)),))
        await self.host.start()
        return self.host.port

    async def stop(self) -> None:
        """Drain (running calls finish, for drain_seconds at most), then close the store."""
        self.node.draining = True
        await self.host.stop(self.config.drain_seconds, self.node.idle)
        await self.node.close()


async def serve(config: PrefillConfig, stop: asyncio.Event | None = None) -> None:
    server = PrefillServer(config)
    await serve_until_signal(server, lambda _: f"prefill node {server.node.node_id}", stop)
