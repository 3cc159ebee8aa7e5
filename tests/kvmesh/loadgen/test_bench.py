"""`kvmesh bench` end to end: the four configurations as real local clusters (tiny model), one
seeded workload, the table, JSON, plots and report."""

import json
from pathlib import Path

import pytest

from kvmesh import cluster
from kvmesh.cli import main
from kvmesh.model.convert import convert_gguf
from kvmesh.model.folder import ModelFolder
from kvmesh.model.tiny import write_tiny_gguf


@pytest.fixture(scope="module")
def tiny_2k(tmp_path_factory: pytest.TempPathFactory) -> ModelFolder:
    d = tmp_path_factory.mktemp("bench-model")
    gguf = write_tiny_gguf(d / "tiny-2k.gguf", seed=3, context=2048)
    return ModelFolder.load(convert_gguf(gguf, d / "tiny-2k", "fp32", step=lambda _: None))


def test_the_cascade_on_one_workload(tiny_2k: ModelFolder, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    workload = ["--users", "6", "--apps", "2", "--system-tokens", "300", "--turns", "2", "--user-tokens", "20"]
    timing = ["--max-tokens", "6", "--think-s", "0.2", "--rate", "4", "--seed", "5"]
    fleet = ["--model", str(tiny_2k.path), "--port", "54351", "--no-progress"]
    assert main(["bench", *workload, *timing, *fleet, "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "TTFT p50 ms" in table and "disaggregated" in table
    report = json.loads((out / "bench.json").read_text())
    configs = {c["config"]: c for c in report["configs"]}
    assert list(configs) == ["naive", "prefix_cache", "cache_aware", "disaggregated"]
    for c in configs.values():
        assert c["requests"] == 12 and c["errors"] == 0
        assert c["prompt_tokens"] == configs["naive"]["prompt_tokens"]  # the same conversations everywhere
    assert configs["naive"]["cached_tokens"] == 0  # no prefix cache: every prompt token computed
    for name in ("prefix_cache", "cache_aware", "disaggregated"):
        assert configs[name]["computed_tokens"] < configs["naive"]["computed_tokens"]
    # the system prompts are computed once per node at most, then reused
    assert configs["cache_aware"]["cached_ratio"] > 0.5
    for f in ("report.md", "ttft_cdf.png", "prefill_cascade.png", "node_load.png"):
        assert (out / f).stat().st_size > 0
    assert "![ttft_cdf](ttft_cdf.png)" in (out / "report.md").read_text()


def test_a_running_endpoint(
    tiny_2k: ModelFolder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KVMESH_HOME", str(tmp_path / "home"))
    procs = cluster.up(cluster.ClusterSpec(prefill=1, decode=1, port=54451, model=str(tiny_2k.path)))
    try:
        workload = ["--users", "3", "--apps", "1", "--system-tokens", "200", "--turns", "2", "--user-tokens", "10"]
        flags = ["--max-tokens", "4", "--rate", "5", "--think-s", "0.1", "--model", str(tiny_2k.path)]
        out = tmp_path / "out"
        assert main(["bench", *workload, *flags, "--endpoint", procs[-1].address, "--out", str(out)]) == 0
    finally:
        cluster.down(10)
    (config,) = json.loads((out / "bench.json").read_text())["configs"]
    assert config["config"] == "endpoint" and config["requests"] == 6 and config["errors"] == 0
    assert config["cached_tokens"] > 0  # the second session and the second turns reuse the system prompt
    assert "endpoint" in capsys.readouterr().out
