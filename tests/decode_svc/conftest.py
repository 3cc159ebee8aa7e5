from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from decode_svc.config import DecodeConfig
from decode_svc.server import DecodeServer
from kvmesh.model.folder import ModelFolder
from prefill_svc.config import PrefillConfig
from prefill_svc.server import PrefillServer
from tests.helpers.servers import ServerThread

MakeServer = Callable[..., ServerThread]


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Callable[..., ServerThread]]:
    """Starts prefill and decode servers on 127.0.0.1:0 (each on its own loop); stops them after."""
    started: list[ServerThread] = []

    def start(kind: str, folder: ModelFolder, **kw: object) -> ServerThread:
        if kind == "prefill":
            base = {
                "model": folder.path,
                "store": tmp_path / f"store{len(started)}",
                "port": 0,
                "block_size": 8,
                "threads": 1,
                "drain_seconds": 1.0,
            }
            server = ServerThread(lambda: PrefillServer(PrefillConfig(**{**base, **kw})))  # type: ignore[arg-type]
        else:
            base = {
                "model": folder.path,
                "port": 0,
                "threads": 1,
                "slots": 4,
                "slot_tokens": 200,
                "drain_seconds": 1.0,
                "store": tmp_path / f"store{len(started)}",
                "block_size": 8,
            }
            server = ServerThread(lambda: DecodeServer(DecodeConfig(**{**base, **kw})))  # type: ignore[arg-type]
        started.append(server)
        return server

    yield start
    for s in reversed(started):
        s.stop()
