"""Every benchmark runs end to end at its smallest setting (seconds, the real model, real
services as processes), prints its table and writes its JSON, so none of them rots. Figures are
not checked: a test never asserts a wall-clock time."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kvmesh.model.convert import convert_gguf
from kvmesh.model.folder import ModelFolder
from kvmesh.model.ops import library
from kvmesh.model.prepare import find_default_gguf

ROOT = Path(__file__).resolve().parents[2]


def _bench(script: str, tmp_path: Path, *args: str) -> tuple[str, dict[str, object]]:
    out = tmp_path / "out.json"
    cmd = [sys.executable, str(ROOT / "bench" / script), *args, "--json", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=420, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r.stdout, json.loads(out.read_text())


def test_engine(real_int4: ModelFolder, tmp_path: Path) -> None:
    args = ("--rounds", "1", "--precision", "int4", "--prompt-tokens", "64", "--new-tokens", "16")
    stdout, report = _bench("engine.py", tmp_path, *args)
    assert "kvmesh-exact decode_short_tok_s" in stdout and "step budget" in stdout
    assert set(report["int4"]) >= {"kvmesh", "kvmesh-exact", "genai", "ratio"}  # type: ignore[arg-type]
    assert report["step_budget"]["kvmesh_long"]["context"] == 64  # type: ignore[index]
    assert report["step_budget"]["kvmesh_long"]["attention_ms"] > 0  # type: ignore[index]


def test_decode(real_int4: ModelFolder, tmp_path: Path) -> None:
    sizes = ("--prompt-tokens", "48", "--shared-tokens", "32", "--new-tokens", "24")
    stdout, report = _bench("decode.py", tmp_path, "--concurrency", "1", "2", "--rounds", "1", *sizes)
    rows = report["rows"]
    assert {(r["numerics"], r["streams"]) for r in rows} == {  # type: ignore[attr-defined]
        (n, s) for n in ("default", "exact") for s in (1, 2)
    }
    assert "x 1 stream" in stdout and "batch budget" in stdout
    budget = {(r["numerics"], r["streams"]): r for r in report["budget"]}  # type: ignore[attr-defined]
    assert set(budget) == {(n, s) for n in ("default", "exact") for s in (1, 2)}
    assert all(0 < r["attention_ms"] < r["step_ms"] for r in budget.values())


@pytest.mark.skipif(library() is None, reason="kvmesh's kernel library is not built (scripts/build_ops.sh)")
def test_decode_with_kvmesh_attention(tmp_path: Path) -> None:
    """The opt-in decode graph (kvmesh's DecodeAttention) through the same benchmark, budget included."""
    folder = convert_gguf(
        find_default_gguf(),
        tmp_path / "m",
        "int4",
        step=lambda _: None,
        decode_accuracy_level=4,
        decode_attention="kvmesh",
    )
    sizes = ("--prompt-tokens", "48", "--shared-tokens", "32", "--new-tokens", "24", "--model", str(folder))
    args = ("--concurrency", "1", "2", "--rounds", "1", "--numerics", "default", *sizes)
    stdout, report = _bench("decode.py", tmp_path, *args)
    assert "batch budget" in stdout
    assert all(0 < r["attention_ms"] < r["step_ms"] for r in report["budget"])  # type: ignore[attr-defined]


def test_quality(real_int4: ModelFolder, real_fp32: ModelFolder, tmp_path: Path) -> None:
    stdout, report = _bench("quality.py", tmp_path, "--tokens", "24")
    assert "top-1 agreement" in stdout
    every = [r for r in report["rows"] if r["text"] == "all"]  # type: ignore[attr-defined]
    assert len(every) == 1 and every[0]["positions"] >= 24 and 0 <= every[0]["agree"] <= every[0]["positions"]


def test_prefix_cache(real_int4: ModelFolder, tmp_path: Path) -> None:
    sizes = ("--system-tokens", "64", "--user-tokens", "16")
    stdout, report = _bench("prefix_cache.py", tmp_path, "--rounds", "1", *sizes)
    assert "warm / cold" in stdout
    assert report["cached_tokens_warm"] == 64


def test_disagg(real_int4: ModelFolder, tmp_path: Path) -> None:
    stdout, report = _bench("disagg.py", tmp_path, "--background-tokens", "24", "--long-prompt-tokens", "48")
    assert [r["setup"] for r in report["results"]] == ["colocated", "disaggregated"]  # type: ignore[index]
    assert "disagg/coloc" in stdout


def test_proxy(real_int4: ModelFolder, tmp_path: Path) -> None:
    stdout, report = _bench("proxy.py", tmp_path, "--requests", "2", "--new-tokens", "16", "--concurrent", "4")
    assert "token event p50 ms (added)" in stdout
    assert report["workload"]["requests"] == 2  # type: ignore[index]
    assert report["http"]["concurrent"] == 4 and report["http"]["concurrent_errors"] == 0  # type: ignore[index]


@pytest.mark.parametrize("shape", ["", "--prefill 1 --decode 1 --threads 1"])
def test_peer_kvmesh_side(real_int4: ModelFolder, tmp_path: Path, shape: str) -> None:
    """Without the peer (building llama-server takes ~10 minutes, never in CI): kvmesh's side of
    bench/peer.py through `kvmesh up`'s chosen shape, and a shape given by hand."""
    sizes = ("--new-tokens", "12", "--long-prompt-tokens", "64", "--batch-prompt-tokens", "32", "--streams", "2")
    _, report = _bench(
        "peer.py", tmp_path, "--no-peer", "--rounds", "1", *sizes, *(["--shape", shape] if shape else [])
    )
    assert {(r["workload"], r["metric"]) for r in report["rows"]} >= {  # type: ignore[attr-defined]
        ("short", "tok_s"),
        ("long", "tok_s"),
        ("batch", "itl_p99_ms"),
        ("batch", "steady_p99_ms"),
    }
    assert "colocated" in str(report["shape"]) if not shape else "1 prefill + 1 decode" in str(report["shape"])


def test_multiturn(real_int4: ModelFolder, tmp_path: Path) -> None:
    sizes = ("--sessions", "2", "--turns", "2", "--system-tokens", "48", "--user-tokens", "8", "--reply-tokens", "16")
    stdout, report = _bench("multiturn.py", tmp_path, *sizes)
    assert "write-back on / off" in stdout
    results = report["results"]
    assert {(r["reply_tokens"], r["mode"]) for r in results} == {(16, m) for m in ("off", "exact", "decoded")}  # type: ignore[attr-defined]
    assert all(len(s) == 2 for r in results for s in r["turns"])  # type: ignore[attr-defined]


def test_failover(real_int4: ModelFolder, tmp_path: Path) -> None:
    sizes = ("--streams", "2", "--tokens", "24", "--prompt-tokens", "16", "--rounds", "1")
    stdout, report = _bench("failover.py", tmp_path, *sizes)
    assert "write-back on / off aggregate tok/s" in stdout
    rows = {r["run"]: r for r in report["rows"]}  # type: ignore[attr-defined]
    assert set(rows) == {"undisturbed", "write-back off", "kill, migration on", "kill, migration off"}
    assert all(r["streams"] == 2 for r in rows.values())
    assert len(rows["kill, migration on"]["killed"]) == 2  # decode-0, then prefill-0


def test_the_peer_is_built_natively_and_without_amx_where_the_cpu_has_it() -> None:
    from bench.llama_server import cpu_options

    assert cpu_options(frozenset({"avx2", "fma", "avx512_vnni"})) == (["-DGGML_NATIVE=ON"], "")
    options, tag = cpu_options(frozenset({"avx2", "fma", "avx512f", "avx512_vnni", "amx_int8", "amx_tile"}))
    assert tag == "-noamx" and "-DGGML_NATIVE=OFF" in options
    assert {"-DGGML_AVX2=ON", "-DGGML_AVX512=ON", "-DGGML_AVX512_VNNI=ON", "-DGGML_AVX512_BF16=OFF"} <= set(options)
    assert not any("AMX" in o for o in options)  # ggml's AMX options stay at their default, off


def test_window_gaps_leave_out_the_joins() -> None:
    """Two streams, the second joining late: only gaps inside the window where both decode count."""
    from bench.common import Stream, window_gaps, window_rate

    early = Stream(0.0, [0.1, 0.2, 0.3, 1.3, 1.4, 1.5, 1.6])  # 1.0 s stalled while the other joined
    late = Stream(0.0, [1.2, 1.3, 1.4, 1.5, 1.7])
    gaps = window_gaps([early, late])  # window (1.3, 1.6]: both decode
    assert sorted(round(g, 3) for g in gaps) == [0.1] * 5
    assert max(early.gaps) == 1.0 > max(gaps)
    assert round(window_rate([early, late]), 3) == round(5 / 0.3, 3)
