"""What the proxy knows of its backends: each prefill node's cached blocks (followed through
WatchCache), every node's health (grpc.health.v1 Watch) and load (GetLoad). One asyncio task per
stream, each reconnecting on failure; all owned by Backends and cancelled by close()."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvmesh.rpc import cluster_channel
from kvmesh.v1 import decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc
from proxy.routing import NodeState

log = logging.getLogger(__name__)
RETRY_S, LOAD_EVERY_S, DISCOVER_EVERY_S = 0.5, 0.25, 2.0
CLOSE_S = 2.0  # close(): how long cancelled watches may take to end
# A load poll that gets no answer in POLL_TIMEOUT_S is missed; MISSES in a row make the node suspect
# (out of routing) until one is answered: a frozen node (SIGSTOP, a stalled host) leaves routing in
# ~1 s, since its health stream only goes quiet; a thawed or restarted one is back within a poll.
POLL_TIMEOUT_S, MISSES = 0.5, 2
OPTIONS = [
    ("grpc.max_receive_message_length", 64 << 20),
    # a node that comes back is reconnected within a second (gRPC's default backoff grows to minutes)
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


class Backends:
    """Nodes are `host:port`, or `dns:NAME:PORT`: every address NAME resolves to, re-resolved every
    few seconds, so a pool scaled up or down (compose --scale) is followed."""

    def __init__(
        self,
        prefill: tuple[str, ...],
        decode: tuple[str, ...],
        block_size: int,
        worker: tuple[str, ...] = (),
        token: str = "",
    ) -> None:
        """token: the cluster's, on every call to a node."""
        self._token = token
        self.prefill: dict[str, NodeState] = {}
        self.decode: dict[str, NodeState] = {}
        self.workers: set[str] = set()  # colocated: in both pools; a request decodes where it prefills
        self.block_size = block_size
        self.channels: dict[str, grpc.aio.Channel] = {}
        self._specs = {"prefill": prefill, "decode": decode, "worker": worker}
        self._tasks: list[asyncio.Task[None]] = []  # discovery
        self._node_tasks: dict[str, list[asyncio.Task[None]]] = {}  # followers, per node
        self._dns: dict[str, set[str]] = {}  # dns:NAME:PORT -> the addresses it brought

    def start(self) -> None:
        for kind, specs in self._specs.items():
            for spec in specs:
                if spec.startswith("dns:"):
                    self._tasks.append(asyncio.create_task(self._discover(kind, spec[4:]), name=f"discover:{spec}"))
                else:
                    self._add(kind, spec)

    def _add(self, kind: str, address: str) -> None:
        self.channels[address] = cluster_channel(address, self._token, OPTIONS)
        self._node_tasks[address] = []
        if kind == "worker":
            self.workers.add(address)
        if kind in ("prefill", "worker"):
            node = self.prefill[address] = NodeState(address, healthy=False)
            self._spawn(self._follow_cache, address, node)
            self._spawn(self._follow_health, address, node, "kvmesh.v1.Prefill")
            self._spawn(self._poll_prefill_load, address, node)
        if kind in ("decode", "worker"):
            node = self.decode[address] = NodeState(address, healthy=False)
            self._spawn(self._follow_health, address, node, "kvmesh.v1.Decode")
            self._spawn(self._poll_decode_load, address, node)

    async def _remove(self, address: str) -> None:
        for task in self._node_tasks.pop(address, []):
            task.cancel()
        self.prefill.pop(address, None)
        self.decode.pop(address, None)
        self.workers.discard(address)
        channel = self.channels.pop(address, None)
        if channel is not None:
            await channel.close()

    async def _discover(self, kind: str, name_port: str) -> None:
        host, _, port = name_port.rpartition(":")
        loop = asyncio.get_running_loop()
        while True:
            try:
                infos = await loop.getaddrinfo(host, int(port), family=socket.AF_INET, type=socket.SOCK_STREAM)
                found = {f"{info[4][0]}:{port}" for info in infos}
            except OSError:
                found = None  # keep what we have until the name resolves again
            owned = self._dns.setdefault(name_port, set())
            if found is not None:
                for address in found - owned:
                    if address not in self.channels:  # not also given as a fixed address
                        self._add(kind, address)
                        owned.add(address)
                for address in owned - found:
                    await self._remove(address)
                    owned.discard(address)
            await asyncio.sleep(DISCOVER_EVERY_S)

    def _spawn(self, loop: Callable[..., Awaitable[None]], address: str, *args: object) -> None:
        async def forever() -> None:
            while True:
                try:
                    await loop(address, *args)
                except grpc.aio.AioRpcError as e:
                    log.info("%s to %s: %s %s", loop.__name__, address, e.code().name, e.details())
                await asyncio.sleep(RETRY_S)

        self._node_tasks[address].append(asyncio.create_task(forever(), name=f"{loop.__name__}:{address}"))

    async def _follow_cache(self, address: str, node: NodeState) -> None:
        """A snapshot (in batches), then stored/evicted events; a reconnect resyncs."""
        stub = prefill_pb2_grpc.PrefillStub(self.channels[address])
        snapshot: set[bytes] = set()
        async for ev in stub.WatchCache(prefill_pb2.WatchCacheRequest()):
            self.block_size = ev.block_size or self.block_size
            if ev.kind == prefill_pb2.CacheEvent.SNAPSHOT:
                snapshot.update(ev.block_keys)
                if ev.snapshot_done:
                    node.blocks, snapshot = snapshot, set()
            elif ev.kind == prefill_pb2.CacheEvent.STORED:
                node.blocks.update(ev.block_keys)
            elif ev.kind == prefill_pb2.CacheEvent.EVICTED:
                node.blocks.difference_update(ev.block_keys)

    def _judge(self, address: str, node: NodeState) -> None:
        healthy = node.serving and node.missed_polls < MISSES
        if healthy != node.healthy:
            level = logging.INFO if healthy else logging.WARNING
            why = "serving" if healthy else "not answering" if node.serving else "not serving"
            log.log(level, "node health", extra={"node": address, "healthy": healthy, "why": why})
        node.healthy = healthy

    def _answered(self, address: str, node: NodeState, answered: bool) -> None:
        node.missed_polls = 0 if answered else node.missed_polls + 1
        self._judge(address, node)

    async def _follow_health(self, address: str, node: NodeState, service: str) -> None:
        stub = health_pb2_grpc.HealthStub(self.channels[address])
        try:
            async for reply in stub.Watch(health_pb2.HealthCheckRequest(service=service)):
                node.serving = reply.status == health_pb2.HealthCheckResponse.SERVING
                self._judge(address, node)
        finally:
            node.serving = False
            self._judge(address, node)

    async def _poll(self, address: str, node: NodeState, ask: Callable[[], Awaitable[None]]) -> None:
        """Every LOAD_EVERY_S, `ask` within POLL_TIMEOUT_S; an error or no answer is a miss."""
        while True:
            try:
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel that comes as
                # the answer does, and close() then waited for this loop forever
                async with asyncio.timeout(POLL_TIMEOUT_S):
                    await ask()
                self._answered(address, node, True)
            except (grpc.aio.AioRpcError, TimeoutError):
                self._answered(address, node, False)
            await asyncio.sleep(LOAD_EVERY_S)

    async def _poll_prefill_load(self, address: str, node: NodeState) -> None:
        stub = prefill_pb2_grpc.PrefillStub(self.channels[address])
        loop = asyncio.get_running_loop()

        async def ask() -> None:
            asked = loop.time()
            queued = (await stub.GetLoad(prefill_pb2.GetLoadRequest(), timeout=POLL_TIMEOUT_S)).queued_prefill_tokens
            if asked >= node.changed_at:  # else our routing changed it meanwhile: this report is stale
                node.reported_tokens = queued

        await self._poll(address, node, ask)

    async def _poll_decode_load(self, address: str, node: NodeState) -> None:
        """A decode node's reported_tokens hold its running sequences: the tie-breaker after our own
        in-flight count when the proxy picks the least loaded decode node."""
        stub = decode_pb2_grpc.DecodeStub(self.channels[address])

        async def ask() -> None:
            load = await stub.GetLoad(decode_pb2.GetDecodeLoadRequest(), timeout=POLL_TIMEOUT_S)
            node.reported_tokens = load.running_sequences

        await self._poll(address, node, ask)

    def any_healthy(self) -> bool:
        return any(n.healthy for n in self.prefill.values()) and any(n.healthy for n in self.decode.values())

    async def wait_healthy(self, timeout_s: float) -> bool:
        """True once one prefill and one decode node are healthy (at start, or after a failover)."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not self.any_healthy():
            if asyncio.get_running_loop().time() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    async def close(self) -> None:
        tasks = [*self._tasks, *(t for ts in self._node_tasks.values() for t in ts)]
        for task in tasks:
            task.cancel()
        if tasks:  # bounded: a task that ignored its cancel must not hold the process
            _, stuck = await asyncio.wait(tasks, timeout=CLOSE_S)
            for task in stuck:
                log.warning("%s did not end when cancelled", task.get_name())
        for channel in self.channels.values():
            await channel.close()
