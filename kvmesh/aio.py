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
    asked when a wait runs out; True waits another gap_s, the read going on.

    The read's timeout has no deadline of its own: a timer asks patient() as each wait runs out
    and, once it says no, makes the timeout fire at once, so the read is cancelled only then
    (a timer per item, no task: this runs per token on the proxy)."""
    loop, it, wait = asyncio.get_running_loop(), aiter(items), first_s
    while True:
        silent = 0.0
        timer: asyncio.TimerHandle | None = None
        try:
            async with asyncio.timeout(None) as cm:

                def check(waited: float) -> None:
                    nonlocal silent, timer
                    silent += waited
                    if patient is not None and patient(silent):
                        timer = loop.call_later(gap_s, check, gap_s)
                    else:
                        cm.reschedule(loop.time())  # the timeout fires now

                timer = loop.call_later(wait, check, wait)
                try:
                    item = await anext(it)
                finally:
                    if timer is not None:
                        timer.cancel()
        except StopAsyncIteration:
            return
        except TimeoutError as e:
            raise Stalled(silent) from e
        yield item
        wait = gap_s


def run(main: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)
