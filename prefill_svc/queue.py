"""The prefill node's wait list: one model thread, shared fairly by the tenants queued for it.

Jobs are grouped by tenant (the request's cache salt: the proxy derives it from the tenant, so a
node tells tenants apart without knowing their names). The next job to run is the oldest of the
group served least recently, so a tenant with a hundred prompts queued delays another tenant's by
at most one prompt, not a hundred. The queue is bounded by the prompt tokens it holds (the running
job's included); when it is full, a group holding less than an equal share of the bound makes room
by refusing the newest waiting jobs of the groups holding more than theirs (RESOURCE_EXHAUSTED: the
proxy tries another node or tells its client), so one tenant filling the queue cannot lock the
others out of it. With one tenant it is the FIFO it replaces.

Background work (recomputing a finished reply's blocks exactly) runs only when no job waits, a
piece at a time, so a prompt arriving waits for at most one piece of it.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

from kvmesh.errors import ResourceExhausted

T = TypeVar("T")
log = logging.getLogger(__name__)
BACKGROUND_LIMIT = 1024  # pieces of background work queued; beyond, new work is dropped


@dataclass(eq=False)
class _Job:
    group: bytes
    tokens: int
    turn: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class FairQueue:
    """`await run(group, tokens, fn)`: fn() on the one model thread when its turn comes; `tokens`
    (the work it holds the queue for) counts from admission to fn's end."""

    def __init__(self, limit_tokens: int, thread_name: str, on_pushed_out: Callable[[], None]) -> None:
        self.limit = limit_tokens
        self._on_pushed_out = on_pushed_out
        self._thread = ThreadPoolExecutor(1, thread_name_prefix=thread_name)
        self._waiting: dict[bytes, deque[_Job]] = {}  # groups with jobs not yet run
        # When each group was last served; one arriving counts as served just before the last
        # job given the thread, so it goes after every group waiting longer, not after all.
        self._stamp: dict[bytes, float] = {}
        self._served = 0
        self._held: Counter[bytes] = Counter()  # tokens per group, waiting or running
        self._jobs: Counter[bytes] = Counter()  # jobs per group, waiting or running
        self._busy: _Job | None = None  # given the model thread (running, or about to)
        self._background: deque[Callable[[], bool]] = deque()
        self.tokens = 0  # held in all: what admission and load reports count

    @property
    def running(self) -> int:
        return int(self._busy is not None)

    @property
    def idle(self) -> bool:
        """Nothing running, waiting, or queued in the background."""
        return self._busy is None and not self._waiting and not self._background

    async def run(self, group: bytes, tokens: int, fn: Callable[[], T]) -> T:
        job = self._admit(group, tokens)
        try:
            self._dispatch()
            await job.turn  # ResourceExhausted if pushed out while it waited
        except BaseException:
            if job.turn.done() and not job.turn.cancelled() and job.turn.exception() is None:
                self._finish(job)  # its turn came as its caller left: the next one's now
            elif job in self._waiting.get(group, ()):
                self._unqueue(job)
            raise
        try:
            done = self._thread.submit(fn)
        except BaseException:
            self._finish(job)
            raise
        loop = asyncio.get_running_loop()
        # the next job starts when this one's thread work ends, even if its caller has left
        done.add_done_callback(lambda _: loop.call_soon_threadsafe(self._finish, job))
        return await asyncio.wrap_future(done)

    def _admit(self, group: bytes, tokens: int) -> _Job:
        if self.tokens + tokens > self.limit:
            self._make_room(group, tokens)
        job = _Job(group, tokens)
        self._waiting.setdefault(group, deque()).append(job)
        self._stamp.setdefault(group, self._served - 0.5)
        self._held[group] += tokens
        self._jobs[group] += 1
        self.tokens += tokens
        return job

    def _make_room(self, group: bytes, tokens: int) -> None:
        """Refuse the newest waiting jobs of groups over their share when that makes room for this
        one and this one keeps within its own share; else refuse this one."""
        share = self.limit // len(set(self._jobs) | {group})
        need = self.tokens + tokens - self.limit
        victims: list[_Job] = []
        if self._held[group] + tokens <= share:
            over = {g: held - share for g, held in self._held.items() if g != group and held > share}
            for g in sorted(over, key=lambda g: -over[g]):
                for job in reversed(self._waiting.get(g, ())):
                    if need <= 0 or over[g] <= 0:
                        break
                    victims.append(job)
                    need, over[g] = need - job.tokens, over[g] - job.tokens
        if need > 0:
            raise ResourceExhausted(f"prefill queue full ({self.tokens} tokens queued, limit {self.limit})")
        for job in victims:
            self._unqueue(job)
            self._on_pushed_out()
            job.turn.set_exception(
                ResourceExhausted(f"prefill queue full: its tenant held more than its share of {share} tokens")
            )

    def background(self, piece: Callable[[], bool]) -> bool:
        """Run piece() on the model thread when no job waits, again (at the back of the line) as
        long as it returns True. -> False: the backlog is full, not queued."""
        if len(self._background) >= BACKGROUND_LIMIT:
            return False
        self._background.append(piece)
        self._dispatch()
        return True

    def _dispatch(self) -> None:
        """Give the model thread, if free, to the oldest job of the group served least recently,
        or with none waiting to the next piece of background work."""
        if self._busy is not None:
            return
        if not self._waiting:
            if self._background:
                self._run_background(self._background.popleft())
            return
        group = min(self._waiting, key=self._stamp.__getitem__)  # ties: the first to arrive
        jobs = self._waiting[group]
        job = self._busy = jobs.popleft()
        self._stamp[group] = self._served = self._served + 1
        if not jobs:
            del self._waiting[group]
        job.turn.set_result(None)

    def _finish(self, job: _Job, release: bool = True) -> None:
        """The thread is free again; release: the job's tokens and place in its group (a piece of
        background work holds neither)."""
        if self._busy is job:
            self._busy = None
            if release:
                self._release(job)
            self._dispatch()

    def _run_background(self, piece: Callable[[], bool]) -> None:
        job = self._busy = _Job(b"", 0)  # holds the thread; no tokens, in no group's share
        loop = asyncio.get_running_loop()

        def finished(done: Future[bool]) -> None:
            if done.exception() is not None:
                log.error("background work on the model thread failed", exc_info=done.exception())
            elif done.result():
                self._background.append(piece)
            self._finish(job, release=False)

        self._thread.submit(piece).add_done_callback(lambda done: loop.call_soon_threadsafe(finished, done))

    def _unqueue(self, job: _Job) -> None:
        jobs = self._waiting[job.group]
        jobs.remove(job)
        if not jobs:
            del self._waiting[job.group]
        self._release(job)

    def _release(self, job: _Job) -> None:
        self.tokens -= job.tokens
        self._held[job.group] -= job.tokens
        self._jobs[job.group] -= 1
        if not self._jobs[job.group]:
            del self._jobs[job.group], self._held[job.group], self._stamp[job.group]

    def close(self) -> None:
        self._thread.shutdown(wait=True)
