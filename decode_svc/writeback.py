"""Write-back: a sequence's new full blocks, prompt tail and reply, go to the prefix store of the
node that prefilled it as each fills, so the conversation's next turn finds them there, and a
migrated sequence resumes from them (its KV exactly as the decode steps made it).

The decode thread copies a block out of the sequence's slot once it is full (the only work on the
step path: ~0.1 ms a block of SmolLM2); this task sends the jobs in order, one at a time, while
decoding goes on; a sequence's last job (no KV) says it is over, to the prefill node too where the
decode steps' numerics differ from its prefill's (it then recomputes those blocks exactly). A
backlog beyond `limit_bytes` drops the newest (counted): a store is a cache, never a reason to
hold memory or stall."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from decode_svc.sources import Source, StoreJob
from kvmesh.errors import KvmeshError

log = logging.getLogger(__name__)


class WriteBack:
    def __init__(
        self, source: Callable[[], Source], on_outcome: Callable[[str, int], None], limit_bytes: int = 512 << 20
    ) -> None:
        """source: where KV goes back (the node's, asked per job: a colocated worker sets it after
        construction); on_outcome(outcome, tokens): "stored" | "dropped" | "failed", for metrics."""
        self._source, self._on_outcome, self._limit = source, on_outcome, limit_bytes
        self._jobs: asyncio.Queue[StoreJob] = asyncio.Queue()
        self._pending_bytes = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._run(), name="kv-write-back")

    def offer(self, job: StoreJob) -> None:
        """From the decode thread."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._queue, job)

    def _queue(self, job: StoreJob) -> None:
        if job.kv is not None and self._pending_bytes + _bytes(job) > self._limit:
            self._on_outcome("dropped", job.kv.length)
            _settle(job.done)
            return
        self._pending_bytes += _bytes(job)
        self._jobs.put_nowait(job)

    async def _run(self) -> None:
        while True:
            job = await self._jobs.get()
            tokens = job.kv.length if job.kv is not None else 0
            if job.kv is None and not job.last:  # a sequence's end: everything it sent before is done
                _settle(job.done)
                self._jobs.task_done()
                continue
            try:
                await self._source().store(job)
                if tokens:
                    self._on_outcome("stored", tokens)
            except Exception as e:  # the prefill node is gone or refused: the next turn recomputes
                self._on_outcome("failed", tokens)
                level = logging.WARNING if isinstance(e, KvmeshError) else logging.ERROR
                log.log(level, "write-back failed", extra={"request_id": job.request_id, "error": str(e)[:200]})
            finally:
                self._pending_bytes -= _bytes(job)
                _settle(job.done)
                self._jobs.task_done()

    async def close(self, flush_s: float = 2.0) -> None:
        """What is queued goes out for at most flush_s (a drained node's last blocks: where its
        migrated sequences resume), then the task ends."""
        if self._task is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(flush_s):
                    await self._jobs.join()
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def _settle(future: asyncio.Future[None] | None) -> None:
    """Tell whoever waits for a write-back that it is over (stored, dropped or failed)."""
    if future is not None and not future.done():
        future.set_result(None)


def _bytes(job: StoreJob) -> int:
    if job.kv is None:
        return 0
    return sum(k.nbytes + v.nbytes for k, v in zip(job.kv.keys, job.kv.values, strict=True))
