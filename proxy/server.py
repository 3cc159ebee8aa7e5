"""The proxy's gRPC server: the public Generation service on a ServiceHost; its health is SERVING
while at least one prefill and one decode node are."""

from __future__ import annotations

import asyncio
import contextlib
import re

from kvmesh.service import ServiceHost, serve_until_signal
from kvmesh.v1 import generation_pb2, generation_pb2_grpc
from proxy.config import ProxyConfig
from proxy.node import ProxyNode
from proxy.openai_api import OpenAIFrontDoor
from proxy.servicer import GenerationServicer

SERVICE = generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name


class ProxyServer:
    def __init__(self, config: ProxyConfig) -> None:
        self.config = config
        self.node = ProxyNode(config)
        errors = self.node.metrics.errors
        self.host = ServiceHost(
            (SERVICE,), config, self.node.metrics.registry, lambda _method, code: errors.labels(code).inc()
        )
        self._health_task: asyncio.Task[None] | None = None
        self._serving = False
        self.http: OpenAIFrontDoor | None = None
        if config.http_port:
            model_id = config.model_id or re.sub(r"-(int4|fp32|f16|float16)$", "", self.node.folder.path.name)
            self.http = OpenAIFrontDoor(self.node, model_id, lambda: self._serving and not self.node.draining)

    async def start(self) -> int:
        generation_pb2_grpc.add_GenerationServicer_to_server(GenerationServicer(self.node), self.host.server)
        self.node.backends.start()
        await self.host.start(serving=False)
        if self.http is not None:
            await self.http.start(self.config.host, self.config.http_port)
        self._health_task = asyncio.create_task(self._report_health())
        return self.host.port

    async def _report_health(self) -> None:
        serving = None
        while True:
            now = self.node.backends.any_healthy()
            if now != serving:
                await self.host.set_serving(now)
                serving = self._serving = now
            await asyncio.sleep(0.1)

    async def stop(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
        self.node.draining = True
        await self.host.stop(self.config.drain_seconds, lambda: self.node.active == 0)
        if self.http is not None:
            await self.http.stop()
        await self.node.backends.close()


async def serve(config: ProxyConfig, stop: asyncio.Event | None = None) -> None:
    server = ProxyServer(config)
    http = f", OpenAI HTTP API on {config.host}:{server.config.http_port}" if config.http_port else ""
    await serve_until_signal(server, lambda _: f"proxy ({config.policy}{http})", stop)
