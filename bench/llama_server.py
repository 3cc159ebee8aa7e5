"""llama.cpp's own `llama-server`, the peer that bench/peer.py measures kvmesh against.

Built once from the llama-cpp-python sdist on PyPI (its vendored llama.cpp, compiled natively for
this CPU: ~10 minutes on 2 cores) and cached under $KVMESH_HOME/peer; never built in CI. The web UI
is not built and no prebuilt UI is fetched (only the package registry is reachable).

  python bench/llama_server.py            # build (or find) it; prints its path
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kvmesh.model.prepare import kvmesh_home

SDIST = "llama-cpp-python"
CMAKE_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",  # AVX-512 / VNNI where the CPU has them, as a native build would
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_CURL=OFF",
]


def peer_dir() -> Path:
    return kvmesh_home() / "peer"


def find() -> Path | None:
    built = sorted(peer_dir().glob("llama-server-*/llama-server"))
    return built[-1] if built else None


def build(jobs: int | None = None) -> Path:
    """The cached binary, or build it: download the sdist with pip, cmake its vendored llama.cpp."""
    if (found := find()) is not None:
        return found
    peer_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=peer_dir()) as tmp:
        work = Path(tmp)
        pip = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "-d", str(work), SDIST]
        subprocess.run(pip, check=True)
        sdist = next(work.glob("llama_cpp_python-*.tar.gz"))
        version = sdist.name.removeprefix("llama_cpp_python-").removesuffix(".tar.gz")
        with tarfile.open(sdist) as tar:
            tar.extractall(work, filter="data")
        src = work / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
        out = work / "build"
        subprocess.run(["cmake", "-S", str(src), "-B", str(out), *CMAKE_FLAGS], check=True)
        n = str(jobs or os.cpu_count() or 2)
        subprocess.run(["cmake", "--build", str(out), "--target", "llama-server", "-j", n], check=True)
        dest = peer_dir() / f"llama-server-{version}"
        dest.mkdir(exist_ok=True)
        shutil.copy2(out / "bin" / "llama-server", dest / "llama-server")
    found = find()
    assert found is not None
    return found


if __name__ == "__main__":
    print(build())
