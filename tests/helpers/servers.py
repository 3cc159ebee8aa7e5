"""Run an asyncio server object (start() -> port, stop()) on its own loop in a thread, so tests can
call it with plain blocking gRPC stubs over 127.0.0.1."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Any, Protocol


class AsyncServer(Protocol):
    async def start(self) -> int: ...
    async def stop(self) -> None: ...


class ServerThread:
    def __init__(self, make: Callable[[], AsyncServer]) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.server: Any = self.call(self._make(make))
        self.port: int = self.call(self.server.start())

    async def _make(self, make: Callable[[], AsyncServer]) -> AsyncServer:
        return make()  # built inside the loop: grpc.aio binds to the loop that creates it

    def call(self, coro: Awaitable[Any], timeout: float = 120) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)  # type: ignore[arg-type]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.call(self.server.stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


MakeServer = Callable[..., ServerThread]  # the `servers` fixture: (kind, folder, **config) -> a started server
