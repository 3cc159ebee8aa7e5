"""Start and stop the proxy: the public gRPC server with health and reflection, metrics, signals."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from kvmesh.v1 import generation_pb2, generation_pb2_grpc
from proxy.config import ProxyConfig
from proxy.node import ProxyNode
from proxy.servicer import GenerationServicer

log = logging.getLogger(__name__)
SERVICE = generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name


class ProxyServer:
    def __init__(self, config: ProxyConfig) -> None:
        self.config = config
        self.node = ProxyNode(config)
        self.server = grpc.aio.server()
        self.health = health.aio.HealthServicer()
        self.metrics: tuple[Any, Any] | None = None
        self.port = 0
        self._health_task: asyncio.Task[None]

    async def start(self) -> int:
        self.port = self.server.add_insecure_port(f"{self.config.host}:{self.config.port}")
        generation_pb2_grpc.add_GenerationServicer_to_server(GenerationServicer(self.node), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection([SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server)
        if self.config.metrics_port >= 0:
            self.metrics = start_http_server(self.config.metrics_port, self.config.host, self.node.metrics.registry)
        self.node.backends.start()
        await self.server.start()
        self._health_task = asyncio.create_task(self._report_health())
        return self.port

    async def _report_health(self) -> None:
        """SERVING while at least one prefill and one decode node are healthy."""
        serving = None
        while True:
            now = self.node.backends.any_healthy()
            if now != serving:
                status = health_pb2.HealthCheckResponse.SERVING if now else health_pb2.HealthCheckResponse.NOT_SERVING
                for name in ("", SERVICE):
                    await self.health.set(name, status)
                serving = now
            await asyncio.sleep(0.1)

    async def stop(self) -> None:
        self._health_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._health_task
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.config.drain_seconds)
        if self.metrics:
            self.metrics[0].shutdown()
        await self.node.backends.close()


async def serve(config: ProxyConfig, stop: asyncio.Event | None = None) -> None:
    stop = stop or asyncio.Event()
    server = ProxyServer(config)
    port = await server.start()
    metrics_at = f", metrics on {config.host}:{server.metrics[0].server_port}" if server.metrics else ""
    print(f"proxy ({config.policy}) listening on {config.host}:{port}{metrics_at}", flush=True)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("draining")
    await server.stop()
