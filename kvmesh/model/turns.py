"""Model runs of one process taking turns: a colocated worker's decode steps and prefill chunks.

On a machine whose cores one model run already fills (ORT's intra-op threads), a prefill running
beside the decode batch slows both and stalls every running stream for the prefill's length. Taking
turns instead, a waiting prefill chunk runs between two decode steps and a waiting step between two
chunks: a stream's gap is at most a step plus a chunk, and either side runs freely when the other
has nothing to do.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

Side = Literal["decode", "prefill"]
_OTHER: dict[Side, Side] = {"decode": "prefill", "prefill": "decode"}


class Turns:
    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._running = False
        self._last: Side | None = None  # the side that ran last
        self._waiting: dict[Side, int] = {"decode": 0, "prefill": 0}

    @contextmanager
    def turn(self, side: Side) -> Iterator[None]:
        """Run one step or chunk: after the other side's, when it waits too."""
        with self._cv:
            self._waiting[side] += 1
            while self._running or (self._last == side and self._waiting[_OTHER[side]]):
                self._cv.wait()
            self._waiting[side] -= 1
            self._running = True
        try:
            yield
        finally:
            with self._cv:
                self._running, self._last = False, side
                self._cv.notify_all()
