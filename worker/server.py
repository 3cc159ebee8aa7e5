"""A colocated worker's gRPC server: a decode node whose prompts are prefilled in this process by
a prefill node sharing its model, serving both the Decode and the Prefill service on one port (the
proxy routes to it as to a prefill node, cache events and load included, and decodes there: the
baseline that disaggregation is measured against). Its Decode calls ignore prefill_node."""

from __future__ import annotations

import asyncio
import socket

from decode_svc.node import DecodeNode
from decode_svc.server import SERVICE as DECODE_SERVICE
from decode_svc.servicer import DecodeServicer
from kvmesh.model.turns import Turns
from kvmesh.service import ServiceHost, serve_until_signal
from kvmesh.v1 import decode_pb2_grpc
from prefill_svc.node import PrefillNode
from prefill_svc.server import SERVICE as PREFILL_SERVICE
from prefill_svc.servicer import PrefillServicer, handlers
from worker.config import WorkerConfig
from worker.source import LocalPrefill


class WorkerServer:
    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        # decode steps and prefill chunks, or runs of several prompts together, take turns
        turns = Turns() if config.prefill.prefill_chunk_tokens or config.prefill.prefill_together_tokens else None
        self.node = DecodeNode(config.decode, turns)
        self.prefill = PrefillNode(config.prefill, self.node.runner, self.node.metrics.registry, turns)
        self.node.source = LocalPrefill(self.prefill, self.node.batcher.lease)  # closed with the decode node
        self.host = ServiceHost((DECODE_SERVICE, PREFILL_SERVICE), config.decode, self.node.metrics.registry)

    async def start(self) -> int:
        self.node.on_unhealthy = self.prefill.on_unhealthy = self.host.unhealthy_from_thread()
        self.node.node_id = self.config.decode.node_id or f"{socket.gethostname()}:{self.host.port}"
        await self.prefill.start(self.node.node_id)
        self.node.start()
        decode_pb2_grpc.add_DecodeServicer_to_server(DecodeServicer(self.node), self.host.server)
        self.host.server.add_generic_rpc_handlers((handlers(PrefillServicer(self.prefill)),))
        await self.host.start()
        return self.host.port

    async def stop(self) -> None:
        """Drain as a decode node does, then close both halves (the store last)."""
        self.node.drain()
        self.prefill.draining = True
        idle = lambda: self.node.idle() and self.prefill.idle()  # noqa: E731
        await self.host.stop(self.config.decode.drain_seconds, idle, self.node.evict)
        await self.node.close()


async def serve(config: WorkerConfig, stop: asyncio.Event | None = None) -> None:
    server = WorkerServer(config)
    await serve_until_signal(server, lambda _: f"colocated worker {server.node.node_id}", stop)
