"""Start and stop a prefill node: the gRPC server with health and reflection, metrics, signals."""

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

from kvmesh.v1 import prefill_pb2
from prefill_svc.config import PrefillConfig
from prefill_svc.node import PrefillNode
from prefill_svc.servicer import PrefillServicer, handlers

log = logging.getLogger(__name__)
SERVICE = prefill_pb2.DESCRIPTOR.services_by_name["Prefill"].full_name
GRPC_OPTIONS = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]


class PrefillServer:
    """The gRPC server of one prefill node, with health, reflection and metrics."""

    def __init__(self, config: PrefillConfig) -> None:
        self.config = config
        self.node = PrefillNode(config)
        self.server = grpc.aio.server(options=GRPC_OPTIONS)
        self.health = health.aio.HealthServicer()
        self.metrics: tuple[Any, Any] | None = None
        self.port = 0

    async def start(self) -> int:
        self.port = self.server.add_insecure_port(f"{self.config.host}:{self.config.port}")
        await self.node.start(self.config.node_id or f"{socket.gethostname()}:{self.port}")
        self.server.add_generic_rpc_handlers((handlers(PrefillServicer(self.node)),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection([SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server)
        if self.config.metrics_port >= 0:
            self.metrics = start_http_server(self.config.metrics_port, self.config.host, self.node.metrics.registry)
        await self.server.start()
        for name in ("", SERVICE):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return self.port

    async def stop(self) -> None:
        """Drain: report NOT_SERVING, let running calls finish for drain_seconds, close the store."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.config.drain_seconds)
        if self.metrics:
            self.metrics[0].shutdown()
        await self.node.close()


async def serve(config: PrefillConfig, stop: asyncio.Event | None = None) -> None:
    """Run until SIGTERM/SIGINT (or `stop`), then drain."""
    stop = stop or asyncio.Event()
    server = PrefillServer(config)
    port = await server.start()
    metrics_at = f", metrics on {config.host}:{server.metrics[0].server_port}" if server.metrics else ""
    print(f"prefill node {server.node.node_id} listening on {config.host}:{port}{metrics_at}", flush=True)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("draining")
    await server.stop()
