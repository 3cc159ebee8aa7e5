"""llama.cpp's own `llama-server`, the peer that bench/peer.py measures kvmesh against.

Built once from the llama-cpp-python sdist on PyPI (its vendored llama.cpp, compiled natively for
this CPU, AMX left out: see cpu_options; ~10 minutes on 2 cores) and cached under
$KVMESH_HOME/peer; never built in CI. The web UI is not built and no prebuilt UI is fetched (only
the package registry is reachable).

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
from kvmesh.model.runner import cpu_flags

SDIST = "llama-cpp-python"
CMAKE_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_CURL=OFF",
]


# cpuinfo flag -> ggml's option, for a build that names the CPU's features one by one
ISA = {
    "sse4_2": "GGML_SSE42",
    "avx": "GGML_AVX",
    "avx2": "GGML_AVX2",
    "bmi2": "GGML_BMI2",
    "fma": "GGML_FMA",
    "f16c": "GGML_F16C",
    "avx_vnni": "GGML_AVX_VNNI",
    "avx512f": "GGML_AVX512",
    "avx512vbmi": "GGML_AVX512_VBMI",
    "avx512_vnni": "GGML_AVX512_VNNI",
    "avx512_bf16": "GGML_AVX512_BF16",
}


def cpu_options(flags: frozenset[str]) -> tuple[list[str], str]:
    """ggml's instruction-set options for this CPU, and the build's tag. A native build (every
    feature the CPU has) unless it has AMX: ggml's AMX matmul crashed with SIGSEGV at the first
    batch on a Xeon VM here, so there every other feature is named and AMX left out."""
    if "amx_int8" not in flags:
        return ["-DGGML_NATIVE=ON"], ""
    named = [f"-D{option}={'ON' if flag in flags else 'OFF'}" for flag, option in ISA.items()]
    return ["-DGGML_NATIVE=OFF", *named], "-noamx"


def peer_dir() -> Path:
    return kvmesh_home() / "peer"


def find() -> Path | None:
    _, tag = cpu_options(cpu_flags())
    built = sorted(peer_dir().glob("llama-server-*/llama-server"))
    built = [p for p in built if p.parent.name.endswith("-noamx") == bool(tag)]
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
        options, tag = cpu_options(cpu_flags())
        subprocess.run(["cmake", "-S", str(src), "-B", str(out), *CMAKE_FLAGS, *options], check=True)
        n = str(jobs or os.cpu_count() or 2)
        subprocess.run(["cmake", "--build", str(out), "--target", "llama-server", "-j", n], check=True)
        dest = peer_dir() / f"llama-server-{version}{tag}"
        dest.mkdir(exist_ok=True)
        shutil.copy2(out / "bin" / "llama-server", dest / "llama-server")
    found = find()
    assert found is not None
    return found


if __name__ == "__main__":
    print(build())
