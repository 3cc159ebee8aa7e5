"""The prefill node's wait list: tenants take turns on the model thread, and one tenant filling the
queue cannot lock another out of it."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import pytest

from kvmesh.errors import ResourceExhausted
from prefill_svc.queue import FairQueue, Together


class Model:
    """Stands for the model thread's work: each job records its name and, while `gate` is clear,
    holds the thread (so jobs queue up behind it)."""

    def __init__(self) -> None:
        self.order: list[str] = []
        self.gate = threading.Event()
        self.threads: set[str] = set()

    def job(self, name: str) -> Callable[[], str]:
        def run() -> str:
            self.threads.add(threading.current_thread().name)
            self.gate.wait(10)
            self.order.append(name)
            return name

        return run


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_tenants_take_turns_and_one_tenant_keeps_its_order() -> None:
    async def main() -> tuple[list[str], set[str], int]:
        model, pushed = Model(), []
        queue = FairQueue(1000, "model", lambda: pushed.append(1))
        calls = [asyncio.create_task(queue.run(b"a", 10, model.job("a0")))]
        await _settle()  # a0 holds the thread
        calls += [asyncio.create_task(queue.run(b"a", 10, model.job(f"a{i}"))) for i in range(1, 5)]
        await _settle()
        calls += [asyncio.create_task(queue.run(b"b", 10, model.job(f"b{i}"))) for i in range(2)]
        calls.append(asyncio.create_task(queue.run(b"c", 10, model.job("c0"))))
        await _settle()
        assert queue.tokens == 80 and queue.running == 1
        model.gate.set()
        assert [await c for c in calls] == ["a0", "a1", "a2", "a3", "a4", "b0", "b1", "c0"]
        queue.close()
        return model.order, model.threads, queue.tokens + len(pushed)

    order, threads, left = asyncio.run(main())
    # a0 ran first; then the tenant served least recently: b and c before the rest of a's backlog
    assert order == ["a0", "b0", "c0", "a1", "b1", "a2", "a3", "a4"]
    assert len(threads) == 1  # one model thread
    assert left == 0  # nothing held, nobody pushed out


def test_a_full_queue_makes_room_for_a_tenant_under_its_share() -> None:
    async def main() -> None:
        model, pushed = Model(), []
        queue = FairQueue(100, "model", lambda: pushed.append(1))
        flood = [asyncio.create_task(queue.run(b"a", 20, model.job(f"a{i}"))) for i in range(5)]
        await _settle()
        assert queue.tokens == 100
        with pytest.raises(ResourceExhausted):  # a's own next one: no room, a holds everything
            await queue.run(b"a", 20, model.job("a5"))
        other = asyncio.create_task(queue.run(b"b", 30, model.job("b0")))
        await _settle()
        # b (30 of its 50-token share) took the place of a's two newest waiting jobs
        done = [f for f in flood if f.done()]
        assert len(done) == 2 and all(isinstance(f.exception(), ResourceExhausted) for f in done)
        assert flood[3] in done and flood[4] in done and len(pushed) == 2
        assert queue.tokens == 90
        with pytest.raises(ResourceExhausted):  # beyond b's share (50): no one is pushed for it
            await queue.run(b"b", 30, model.job("b1"))
        model.gate.set()
        assert await other == "b0"
        assert [await f for f in flood[:3]] == ["a0", "a1", "a2"]
        assert model.order == ["a0", "b0", "a1", "a2"] and queue.tokens == 0
        queue.close()

    asyncio.run(main())


def test_a_caller_that_leaves_frees_its_place() -> None:
    async def main() -> None:
        model = Model()
        queue = FairQueue(100, "model", lambda: None)
        first = asyncio.create_task(queue.run(b"a", 40, model.job("a0")))
        await _settle()
        waiting = asyncio.create_task(queue.run(b"b", 40, model.job("b0")))
        await _settle()
        waiting.cancel()  # left while waiting: out of the queue at once
        await _settle()
        assert queue.tokens == 40
        first.cancel()  # left while running: its tokens held until the thread's work ends
        await _settle()
        assert queue.tokens == 40 and queue.running == 1
        after = asyncio.create_task(queue.run(b"c", 10, model.job("c0")))
        model.gate.set()
        assert await after == "c0"
        assert model.order == ["a0", "c0"] and queue.tokens == 0 and queue.running == 0
        queue.close()

    asyncio.run(main())


def test_jobs_that_run_together_share_one_call_in_serving_order() -> None:
    async def main() -> None:
        model = Model()
        calls: list[list[str]] = []

        def run(items: list[str]) -> list[object]:
            calls.append(items)
            return [ValueError(item) if item == "bad" else item.upper() for item in items]

        together = Together(run, limit=3, max_tokens=100)
        queue = FairQueue(1000, "model", lambda: None)
        first = asyncio.create_task(queue.run(b"a", 10, model.job("a0")))
        await _settle()  # a0 holds the thread
        jobs = {
            "t1": asyncio.create_task(queue.run_together(b"a", 10, "t1", together)),
            "t2": asyncio.create_task(queue.run_together(b"b", 10, "t2", together)),
            "p": asyncio.create_task(queue.run(b"c", 10, model.job("p"))),
            "t3": asyncio.create_task(queue.run_together(b"a", 10, "t3", together)),
            "bad": asyncio.create_task(queue.run_together(b"c", 10, "bad", together)),
            "big": asyncio.create_task(queue.run_together(b"d", 95, "big", together)),
        }
        await _settle()
        model.gate.set()
        assert await first == "a0"
        assert await jobs["t1"] == "T1" and await jobs["t2"] == "T2" and await jobs["t3"] == "T3"
        with pytest.raises(ValueError):  # its own failure, not its companions'
            await jobs["bad"]
        assert await jobs["p"] == "p" and await jobs["big"] == "BIG"
        # b and c waited longest: b's t2, then c's next job that can join (not p), then a's oldest;
        # then p (c's turn), and the rest: "big" never fits beside another
        assert calls == [["t2", "bad", "t1"], ["big"], ["t3"]]
        assert model.order == ["a0", "p"] and queue.tokens == 0 and queue.running == 0
        queue.close()

    asyncio.run(main())
