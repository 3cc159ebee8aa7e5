"""Start and stop a decode node (or a colocated worker): the gRPC server with health and
reflection, metrics, signals, drain."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from decode_svc.config import DecodeConfig
from decode_svc.node import DecodeNode
from decode_svc.servicer import DecodeServicer
from kvmesh.v1 import decode_pb2, decode_pb2_grpc

log = logging.getLogger(__name__)
SERVICE = decode_pb2.DESCRIPTOR.services_by_name["Decode"].full_name
GRPC_OPTIONS = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]


class DecodeServer:
    def __init__(self, config: DecodeConfig) -> None:
        self.config = config
        self.node = DecodeNode(config)
        self.server = grpc.aio.server(options=GRPC_OPTIONS)
        self.health = health.aio.HealthServicer()
        self.metrics: tuple[Any, Any] | None = None
        self.port = 0

    async def start(self) -> int:
        self.port = self.server.add_insecure_port(f"{self.config.host}:{self.config.port}")
        self.node.node_id = self.config.node_id or f"{socket.gethostname()}:{self.port}"
        decode_pb2_grpc.add_DecodeServicer_to_server(DecodeServicer(self.node), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection([SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server)
        if self.config.metrics_port >= 0:
            self.metrics = start_http_server(self.config.metrics_port, self.config.host, self.node.metrics.registry)
        await self.server.start()
        for name in ("", SERVICE):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return self.port

    async def stop(self) -> None:
        """Drain: NOT_SERVING, refuse new requests, let running sequences finish for drain_seconds."""
        self.node.drain()
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.config.drain_seconds)
        if self.metrics:
            self.metrics[0].shutdown()
        await self.node.close()


async def serve(config: DecodeConfig, stop: asyncio.Event | None = None) -> None:
    stop = stop or asyncio.Event()
    server = DecodeServer(config)
    port = await server.start()
    kind = "colocated worker" if config.colocated else "decode node"
    metrics_at = f", metrics on {config.host}:{server.metrics[0].server_port}" if server.metrics else ""
    print(f"{kind} {server.node.node_id} listening on {config.host}:{port}{metrics_at}", flush=True)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("draining")
    await server.stop()
