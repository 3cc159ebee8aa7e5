from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kvmesh.model.folder import ModelFolder
from kvmesh.model.runner import ModelRunner, RunnerConfig
from kvmesh.model.turns import Turns
from prefill_svc.engine import PrefillEngine
from prefill_svc.store import PrefixStore, StoreConfig, StoreWriter

BLOCK = 8  # tiny model: small blocks, so short prompts span several


class Events:
    """Collects what the store reports, as a router following WatchCache would."""

    def __init__(self) -> None:
        self.log: list[tuple[str, list[bytes]]] = []

    def __call__(self, kind: str, keys: list[bytes]) -> None:
        self.log.append((kind, keys))


EngineFactory = Callable[..., tuple[PrefillEngine, Events]]


@pytest.fixture
def make_engine(tiny_fp32: ModelFolder, tmp_path: Path) -> Iterator[EngineFactory]:
    opened: list[tuple[PrefixStore, StoreWriter]] = []
    runner = ModelRunner(tiny_fp32, RunnerConfig(threads=1))

    def make(
        path: Path | None = None,
        budget_bytes: int = 1 << 30,
        fingerprint: str | None = None,
        cache: bool = True,
        busy: bool = False,  # the node never quiet: writes wait their longest (a minute)
        turns: Turns | None = None,
        chunk_tokens: int = 0,
        reuse_decoded: bool = False,
    ) -> tuple[PrefillEngine, Events]:
        config = StoreConfig(path or tmp_path / "store", budget_bytes=budget_bytes, block_size=BLOCK)
        store = PrefixStore(config, fingerprint or tiny_fp32.fingerprint, runner.layout)
        events = Events()
        writer = StoreWriter(store, events, lambda: not busy, max_wait_s=60.0 if busy else 0.5)
        opened.append((store, writer))
        fp = fingerprint or tiny_fp32.fingerprint
        engine = PrefillEngine(runner, store, writer, fp, cache, turns, chunk_tokens, reuse_decoded)
        return engine, events

    yield make
    for store, writer in opened:
        writer.close()
        store.close()
