"""The prefill node's wait list: one model thread, shared fairly by the tenants queued for it.

Jobs are grouped by tenant (the request's cache salt: the proxy derives it from the tenant, so a
node tells tenants apart without knowing their names). The next job to run is the oldest of the
group served least recently, so a tenant with a hundred prompts queued delays another tenant's by
at most one prompt, not a hundred. The queue is bounded by the prompt tokens it holds (the running
job's included); when it is full, a group holding less than an equal share of the bound makes room
by refusing the newest waiting jobs of the groups holding more than theirs (RESOURCE_EXHAUSTED: the
proxy tries another node or tells its client), so one tenant filling the queue cannot lock the
others out of it. With one tenant it is the FIFO it replaces.

Jobs that can share one model run (a colocated worker's prefills into decode slots: `Together`)
are taken with the one whose turn it is, the next such job of each group in the same order, up to
the run's limits: the others wait for one run, not one each.

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
from typing import Any, TypeVar

from kvmesh.errors import ResourceExhausted

T = TypeVar("T")
log = logging.getLogger(__name__)
BACKGROUND_LIMIT = 1024  # pieces of background work queued; beyond, new work is dropped


@dataclass(frozen=True, eq=False)
class Together:
    """Jobs that may run in one call on the model thread: run(items) -> for each item its result,
    or the exception it failed with; at most `limit` items and `max_tokens` queued tokens a call."""

    run: Callable[[list[Any]], list[Any]]
    limit: int
    max_tokens: int


@dataclass(eq=False)
class _Job:
    group: bytes
    tokens: int
    work: Callable[[], Any] | None = None  # alone
    item: Any = None  # or one item of a Together call
    together: Together | None = None
    result: asyncio.Future[Any] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


def _retrieved(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # a result nobody waits for any more: no "never retrieved" warning


class FairQueue:
    """`await run(group, tokens, fn)`: fn() on the one model thread when its turn comes; `tokens`
    (the work it holds the queue for) counts from admission to fn's end. `run_together`: the same
    for one item of a `Together` call, which may carry other groups' items too."""

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
        self._busy: list[_Job] = []  # given the model thread, in one call
        self._background: deque[Callable[[], bool]] = deque()
        self.tokens = 0  # held in all: what admission and load reports count

    @property
    def running(self) -> int:
        return len(self._busy)

    @property
    def idle(self) -> bool:
        """Nothing running, waiting, or queued in the background."""
        return not self._busy and not self._waiting and not self._background

    async def run(self, group: bytes, tokens: int, fn: Callable[[], T]) -> T:
        result: T = await self._wait(self._admit(_Job(group, tokens, work=fn)))
        return result

    async def run_together(self, group: bytes, tokens: int, item: Any, together: Together) -> Any:
        return await self._wait(self._admit(_Job(group, tokens, item=item, together=together)))

    async def _wait(self, job: _Job) -> Any:
        self._dispatch()
        try:
            return await asyncio.shield(job.result)  # ResourceExhausted if pushed out while it waited
        except asyncio.CancelledError:
            if job in self._waiting.get(job.group, ()):
                self._unqueue(job)
                job.result.cancel()
            else:  # running: the next job starts when this one's thread work ends
                job.result.add_done_callback(_retrieved)
            raise

    def _admit(self, job: _Job) -> _Job:
        if self.tokens + job.tokens > self.limit:
            self._make_room(job.group, job.tokens)
        self._waiting.setdefault(job.group, deque()).append(job)
        self._stamp.setdefault(job.group, self._served - 0.5)
        self._held[job.group] += job.tokens
        self._jobs[job.group] += 1
        self.tokens += job.tokens
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
            job.result.set_exception(
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
        """Give the model thread, if free, to the oldest job of the group served least recently
        (with the jobs that can run with it), or with none waiting to the next piece of background work."""
        if self._busy:
            return
        if not self._waiting:
            if self._background:
                self._run_background(self._background.popleft())
            return
        group = min(self._waiting, key=self._stamp.__getitem__)  # ties: the first to arrive
        first = self._serve(self._waiting[group][0])
        jobs = [first] if first.together is None else [first, *self._companions(first, first.together)]
        self._busy = jobs
        if first.together is None:
            work = first.work
            assert work is not None
            call: Callable[[], list[Any]] = lambda: [work()]  # noqa: E731
        else:
            run, items = first.together.run, [job.item for job in jobs]
            call = lambda: run(items)  # noqa: E731
        loop = asyncio.get_running_loop()
        try:
            done = self._thread.submit(call)
        except RuntimeError as e:  # the thread was shut down: the node is closing
            self._settle(jobs, e)
            return
        done.add_done_callback(
            lambda done: loop.call_soon_threadsafe(self._settle, jobs, done.exception() or done.result())
        )

    def _serve(self, job: _Job) -> _Job:
        """Take a waiting job for the thread; its group counts as served now."""
        jobs = self._waiting[job.group]
        jobs.remove(job)
        self._stamp[job.group] = self._served = self._served + 1
        if not jobs:
            del self._waiting[job.group]
        return job

    def _companions(self, first: _Job, together: Together) -> list[_Job]:
        """The waiting jobs of `together` that run with `first`: in the order they would be served
        (each group's oldest such job, the group served least recently first), within its limits."""
        taken, tokens = [first], first.tokens
        while len(taken) < together.limit:
            fits = (
                job
                for group in sorted(self._waiting, key=self._stamp.__getitem__)
                for job in self._waiting[group]
                if job.together is together and tokens + job.tokens <= together.max_tokens
            )
            job = next(fits, None)
            if job is None:
                break
            taken.append(self._serve(job))
            tokens += job.tokens
        return taken[1:]

    def _settle(self, jobs: list[_Job], outcome: list[Any] | BaseException) -> None:
        """The thread's call for `jobs` ended (per job its result or error, or the call's error):
        their results, their tokens released, the next call."""
        for i, job in enumerate(jobs):
            result = outcome if isinstance(outcome, BaseException) else outcome[i]
            if job.result.done():
                pass
            elif isinstance(result, BaseException):
                job.result.set_exception(result)
            else:
                job.result.set_result(result)
            self._release(job)
        self._busy = []
        self._dispatch()

    def _run_background(self, piece: Callable[[], bool]) -> None:
        job = _Job(b"", 0)  # holds the thread; no tokens, in no group's share
        self._busy = [job]
        loop = asyncio.get_running_loop()

        def finished(done: Future[bool]) -> None:
            if done.exception() is not None:
                log.error("background work on the model thread failed", exc_info=done.exception())
            elif done.result():
                self._background.append(piece)
            self._busy = []
            self._dispatch()

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
