"""within(): a stream from another node held to deadlines, with and without patience."""

import asyncio
from collections.abc import AsyncIterator

import pytest

from kvmesh.aio import Stalled, within


async def _items(gaps: list[float]) -> AsyncIterator[int]:
    for i, gap in enumerate(gaps):
        await asyncio.sleep(gap)
        yield i


def _collect(patient: object, gaps: list[float]) -> list[int]:
    async def run() -> list[int]:
        return [i async for i in within(_items(gaps), 0.5, 0.05, patient)]  # type: ignore[arg-type]

    return asyncio.run(run())


def test_a_silent_stream_stalls_without_patience() -> None:
    with pytest.raises(Stalled):
        _collect(None, [0.0, 0.2, 0.0])


def test_patience_keeps_the_read_going_and_is_asked_how_long_it_was_silent() -> None:
    """A patient wait keeps the same read (the item after the pause arrives, none is lost), and
    patience is asked with the silence so far: here it gives up past 0.15 s."""
    asked: list[float] = []

    def patient(silent: float) -> bool:
        asked.append(silent)
        return silent < 0.15

    assert _collect(patient, [0.0, 0.12, 0.0, 0.01]) == [0, 1, 2, 3]
    assert asked and asked[0] == pytest.approx(0.05)
    asked.clear()
    with pytest.raises(Stalled):
        _collect(patient, [0.0, 0.5])
    assert max(asked) >= 0.15
