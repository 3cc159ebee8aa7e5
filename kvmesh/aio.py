"""The event loop: uvloop where it is installed, asyncio's own otherwise."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
PER_TOKEN_S = 0.005  # a first answer's deadline grows by this per token of work before it


class Stalled(Exception):
    """A stream from another node that sent nothing within the time its work allows."""

    def __init__(self, waited_s: float) -> None:
        super().__init__(f"no answer in {waited_s:.1f} s")


async def within(items: AsyncIterable[T], first_s: float, gap_s: float) -> AsyncIterator[T]:
    """`items`, the first within first_s, each next one within gap_s; else Stalled (a frozen node's
    stream neither ends nor fails: without this its caller waits forever)."""
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


def run(main: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)
