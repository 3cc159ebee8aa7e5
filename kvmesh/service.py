"""What every kvmesh gRPC server shares: the grpc.aio server with health checking and reflection,
the Prometheus endpoint, and running until SIGTERM/SIGINT, then draining."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from typing import Any, Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc
from prometheus_client import CollectorRegistry, start_http_server

from kvmesh import gc_tuning
from kvmesh.rpc import ErrorBoundary, OnError

log = logging.getLogger(__name__)
# Requests are token lists or chat text: 4 MiB holds any that can fit a context; beyond, gRPC
# answers RESOURCE_EXHAUSTED before any of our code runs. KV chunks are responses (4 MiB less 1 KiB).
MAX_REQUEST_BYTES = 4 << 20
GRPC_OPTIONS = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", MAX_REQUEST_BYTES)]


REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


def _serve_reflection(services: list[str], server: grpc.aio.Server) -> None:
    """Server reflection as grpc.reflection.v1 (what grpcurl asks first) and v1alpha: the two
    protocols are the same messages under two package names, so one servicer answers both."""
    names = [*services, reflection.SERVICE_NAME, REFLECTION_V1]
    servicer = reflection.aio.ReflectionServicer(names)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    method = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        reflection_pb2.ServerReflectionRequest.FromString,
        reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(REFLECTION_V1, {"ServerReflectionInfo": method}),)
    )


class HostSettings(Protocol):
    """What every service's (frozen) config holds for its server."""

    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def metrics_port(self) -> int: ...
    @property
    def cluster_token(self) -> str: ...


IDLE_POLL_S = 0.05  # how often a drain looks whether the node is idle
FLUSH_S = 0.5  # an idle node's last replies this long to leave before the remaining streams are cancelled


class ServiceHost:
    """A grpc.aio server bound to host:port at construction (so the port is known before start),
    with grpc.health.v1 and reflection for `services`; metrics on metrics_port (-1: none, 0: any)."""

    def __init__(
        self,
        services: tuple[str, ...],
        config: HostSettings,
        registry: CollectorRegistry,
        on_error: OnError | None = None,
    ) -> None:
        """config: the service's (where to listen, the metrics port, the cluster token required on
        internal services); on_error(method, status): told of every call that ends in an error."""
        self.services, self.host = services, config.host
        interceptors = [ErrorBoundary(on_error, config.cluster_token)]
        self.server = grpc.aio.server(options=GRPC_OPTIONS, interceptors=interceptors)
        self.port = self.server.add_insecure_port(f"{config.host}:{config.port}")
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        _serve_reflection([*services, health.SERVICE_NAME], self.server)
        self._metrics_port, self._registry = config.metrics_port, registry
        self._metrics: tuple[Any, Any] | None = None

    @property
    def metrics_port(self) -> int | None:
        return int(self._metrics[0].server_port) if self._metrics else None

    async def start(self, serving: bool = True) -> None:
        if self._metrics_port >= 0:
            self._metrics = start_http_server(self._metrics_port, self.host, self._registry)
        await self.server.start()
        if serving:
            await self.set_serving(True)

    def unhealthy_from_thread(self) -> Callable[[], None]:
        """A callable any thread may call to turn this server NOT_SERVING (a node whose background
        thread failed): the proxy stops routing to it. Made on the server's loop."""
        loop = asyncio.get_running_loop()

        def unhealthy() -> None:
            log.error("a background thread failed: NOT_SERVING")
            asyncio.run_coroutine_threadsafe(self.set_serving(False), loop)

        return unhealthy

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *self.services):
            await self.health.set(name, status)

    async def stop(
        self, drain_s: float, idle: Callable[[], bool] | None = None, evict: Callable[[], None] | None = None
    ) -> None:
        """NOT_SERVING; running calls finish for at most drain_s, then the metrics stop. With
        `idle` (the node's own work is done; the node refuses new work while draining) the drain
        ends as soon as it is: what still runs then are streams that never end by themselves (the
        proxy's health and cache watches), cancelled after FLUSH_S. Without, grpc waits for every
        call, those included, for the whole drain_s. `evict`: called when drain_s is over and the
        node is not idle (a decode node ends its streams in a status the proxy migrates); its
        calls then have FLUSH_S to say so."""
        await self.health.enter_graceful_shutdown()
        if idle is not None:
            loop = asyncio.get_running_loop()
            deadline = await _until_idle(idle, drain_s)
            if evict is not None and not idle():
                evict()
                deadline = await _until_idle(idle, FLUSH_S)
            drain_s = min(FLUSH_S, max(deadline - loop.time(), 0.0))
        await self.server.stop(drain_s)
        if self._metrics:
            self._metrics[0].shutdown()


async def _until_idle(idle: Callable[[], bool], timeout_s: float) -> float:
    """Wait until idle() or timeout_s. -> the deadline (loop time)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not idle() and loop.time() < deadline:
        await asyncio.sleep(IDLE_POLL_S)
    return deadline


class Server(Protocol):
    host: ServiceHost

    async def start(self) -> int: ...
    async def stop(self) -> None: ...


async def serve_until_signal(
    server: Server, banner: Callable[[ServiceHost], str], stop: asyncio.Event | None = None
) -> None:
    """Start, print the banner (with the bound port), run until SIGTERM/SIGINT or `stop`, drain."""
    stop = stop or asyncio.Event()
    await server.start()
    gc_tuning.tune_for_serving()  # the model is loaded: what lives now lives for the process
    metrics = f", metrics on {server.host.host}:{server.host.metrics_port}" if server.host.metrics_port else ""
    print(f"{banner(server.host)} listening on {server.host.host}:{server.host.port}{metrics}", flush=True)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("draining")
    await server.stop()
