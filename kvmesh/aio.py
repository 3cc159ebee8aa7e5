"""The event loop: uvloop where it is installed, asyncio's own otherwise."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
PER_TOKEN_S = 0.005  # a first answer's deadline grows by this per token of work before it


class Stalled(Exception):
    """A stream from another node that sent nothing within the time its work allows."""

    def __init__(self, waited_s: float) -> None:
        super().__init__(f"no answer in {waited_s:.1f} s")


async def within(
    items: AsyncIterable[T], first_s: float, gap_s: float, patient: Callable[[float], bool] | None = None
) -> AsyncIterator[T]:
    """`items`, the first within first_s, each next one within gap_s; else Stalled (a frozen node's
    stream neither ends nor fails: without this its caller waits forever). patient(silent_s):
    asked when a wait runs out; True waits another gap_s (the read goes on: a read cancelled
    would end the stream)."""
    if patient is not None:
        async for item in _patiently(aiter(items), first_s, gap_s, patient):
            yield item
        return
    it, wait = aiter(items), first_s
    while True:
        try:
            async with asyncio.timeout(wait):  # a timer per item, no task (wait_for makes one)
                item = await anext(it)
        except StopAsyncIteration:
            return
        except TimeoutError as e:
            raise Stalled(wait) from e
        yield item
        wait = gap_s


async def _patiently(
    it: AsyncIterator[T], first_s: float, gap_s: float, patient: Callable[[float], bool]
) -> AsyncIterator[T]:
    """within() with patience: each read a task, waited on, so it survives a wait that runs out."""
    wait, silent = first_s, 0.0
    pending: asyncio.Future[T] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(it))
            done, _ = await asyncio.wait({pending}, timeout=wait)
            if not done:
                silent += wait
                if not patient(silent):
                    raise Stalled(silent)
                wait = gap_s
                continue
            task, pending = pending, None
            try:
                item = task.result()
            except StopAsyncIteration:
                return
            yield item
            wait, silent = gap_s, 0.0
    finally:
        if pending is not None:
            pending.cancel()


def run(main: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)
