"""Cache events from the store's writer thread to every WatchCache stream."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

QUEUE_LIMIT = 4096  # batches a slow watcher may lag behind before its stream is ended (it resyncs)


@dataclass(frozen=True)
class CacheEvent:
    kind: str  # "stored" | "evicted" | "pinned"; None-like "lagged" ends a stream
    keys: list[bytes]


class CacheEvents:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queues: set[asyncio.Queue[CacheEvent]] = set()

    def publish_threadsafe(self, kind: str, keys: list[bytes]) -> None:
        """Called from the store writer thread."""
        self._loop.call_soon_threadsafe(self._publish, CacheEvent(kind, keys))

    def _publish(self, event: CacheEvent) -> None:
        for q in self._queues:
            if q.qsize() >= QUEUE_LIMIT - 1:
                q.put_nowait(CacheEvent("lagged", []))
            elif not q.full():
                q.put_nowait(event)

    @contextmanager
    def subscribe(self) -> Iterator[asyncio.Queue[CacheEvent]]:
        q: asyncio.Queue[CacheEvent] = asyncio.Queue(QUEUE_LIMIT)
        self._queues.add(q)
        try:
            yield q
        finally:
            self._queues.discard(q)
