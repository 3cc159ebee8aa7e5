"""The CLI as a user runs it: a real subprocess; bad input ends in one clear line, no traceback."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from kvmesh.model.folder import ModelFolder
from kvmesh.model.runner import INT8_DECODE_FLAGS, cpu_flags
from kvmesh.model.tiny import write_tiny_gguf


def kvmesh(*args: str, home: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **({"KVMESH_HOME": str(home)} if home else {})}
    return subprocess.run(
        [sys.executable, "-m", "kvmesh.cli", *args], capture_output=True, text=True, env=env, timeout=120
    )


def _clear_error(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("kvmesh: error:")
    for w in words:
        assert w in result.stderr


def test_generate_streams_text_and_reports(tiny_fp32: ModelFolder) -> None:
    r = kvmesh("generate", "hello", "--model", str(tiny_fp32.path), "--max-tokens", "8", "--threads", "1")
    assert r.returncode == 0, r.stderr
    assert "prompt tokens" in r.stderr and "finish:" in r.stderr


def test_an_endpoint_nobody_serves() -> None:
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _clear_error(kvmesh("generate", "hi", "--endpoint", f"127.0.0.1:{port}"), "UNAVAILABLE")


@pytest.mark.parametrize("flag", [["--top-k", "-3"], ["--seed", "-1"], ["--max-tokens", "0"]])
def test_a_sampling_flag_out_of_range_is_a_usage_error(flag: list[str]) -> None:
    r = kvmesh("generate", "hi", "--endpoint", "127.0.0.1:1", *flag)  # refused before any call
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"argument {flag[0]}: must be an integer >=" in r.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["generate", "hi", "--max-tokens", "0"], "must be an integer >= 1"),
        (["up", "--prefill", "-1"], "must be an integer >= 0"),
        (["bogus"], "invalid choice"),
        (["model"], "required"),
    ],
)
def test_a_usage_error_is_one_line(args: list[str], words: str) -> None:
    r = kvmesh(*args)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert words in r.stderr and "--help)" in r.stderr


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["decode", "--port", "99999"], "port must be a port number from 0 to 65535"),
        (["proxy", "--metrics-port", "-5"], "metrics_port must be a port number"),
        (["worker", "--slots", "0"], "slots >= 1"),
        (["up", "--prefill", "0", "--decode", "2"], "a node that prefills"),
    ],
)
def test_a_setting_out_of_range_is_refused_before_anything_starts(args: list[str], words: str, tmp_path: Path) -> None:
    _clear_error(kvmesh(*args, home=tmp_path), words)
    assert not (tmp_path / "cluster" / "state.json").exists()


def test_missing_model_folder(tmp_path: Path) -> None:
    _clear_error(kvmesh("generate", "hi", "--model", str(tmp_path / "nope")), "does not exist")


def test_incomplete_model_folder(tiny_fp32: ModelFolder, tmp_path: Path) -> None:
    broken = shutil.copytree(tiny_fp32.path, tmp_path / "broken")
    (broken / "tokenizer.json").unlink()
    _clear_error(kvmesh("generate", "hi", "--model", str(broken)), "incomplete", "tokenizer.json")


def test_truncated_weights(tiny_fp32: ModelFolder, tmp_path: Path) -> None:
    broken = shutil.copytree(tiny_fp32.path, tmp_path / "truncated")
    data = broken / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:1000])
    _clear_error(kvmesh("generate", "hi", "--model", str(broken)), "cannot load")


@pytest.mark.parametrize(("kind", "words"), [("arch", ("architecture", "gpt2")), ("quant", ("Q5_0",))])
def test_unsupported_gguf(tmp_path: Path, kind: str, words: tuple[str, ...]) -> None:
    if kind == "arch":
        gguf = write_tiny_gguf(tmp_path / "x.gguf", arch="gpt2")
    else:
        gguf = write_tiny_gguf(tmp_path / "x.gguf", weights="q5_0")
    r = kvmesh("model", "prepare", "--gguf", str(gguf), "--precision", "int4", "--out", str(tmp_path / "out"))
    _clear_error(r, *words)


def test_not_a_gguf(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all" * 10)
    r = kvmesh("model", "prepare", "--gguf", str(bad), "--precision", "fp32", "--out", str(tmp_path / "o"))
    _clear_error(r, "GGUF")


def test_prompt_longer_than_context(tiny_fp32: ModelFolder) -> None:
    _clear_error(kvmesh("generate", "a " * 400, "--model", str(tiny_fp32.path)), "context")


def test_bad_sampling_value(tiny_fp32: ModelFolder) -> None:
    _clear_error(kvmesh("generate", "hi", "--model", str(tiny_fp32.path), "--temperature", "nan"), "temperature")


def test_prepare_is_idempotent(tiny_gguf_f32: Path, tmp_path: Path) -> None:
    out = tmp_path / "m"
    args = ("model", "prepare", "--gguf", str(tiny_gguf_f32), "--precision", "fp32", "--out", str(out))
    assert kvmesh(*args).returncode == 0
    stamp = (out / "model.onnx.data").stat().st_mtime_ns
    again = kvmesh(*args)
    assert again.returncode == 0 and "up to date" in again.stdout
    assert (out / "model.onnx.data").stat().st_mtime_ns == stamp
    # Another float type is another conversion, whose KV (and so its fingerprint) differs.
    fp32 = ModelFolder.load(out).fingerprint
    f16 = kvmesh(*args, "--activations", "float16")
    assert f16.returncode == 0 and "up to date" not in f16.stdout
    assert json.loads((out / "kvmesh.json").read_text())["layout"]["dtype"] == "float16"
    assert ModelFolder.load(out).fingerprint != fp32
    assert "up to date" in kvmesh(*args, "--activations", "float16").stdout


def test_prepare_writes_the_int8_decode_graph_by_default_and_exact_decode_on_request(
    tiny_gguf_q4: Path, tmp_path: Path
) -> None:
    """Decode numerics are the decode graph's alone: switching them converts again (an older folder
    is upgraded) but keeps the fingerprint, so a prefix store stays valid."""
    out = tmp_path / "m"
    args = ("model", "prepare", "--gguf", str(tiny_gguf_q4), "--precision", "int4", "--out", str(out))
    assert kvmesh(*args, "--exact-decode").returncode == 0
    exact = ModelFolder.load(out)
    assert exact.decode_graph is None
    info = kvmesh("model", "info", "--model", str(out), "--threads", "1")
    assert "decode       exact (fp32 activations)" in info.stdout, info.stderr
    upgraded = kvmesh(*args)
    assert upgraded.returncode == 0 and "up to date" not in upgraded.stdout
    default = ModelFolder.load(out)
    assert default.decode_graph is not None and default.meta["decode_accuracy_level"] == 4
    assert default.meta["accuracy_level"] == 0 and default.fingerprint == exact.fingerprint
    info = kvmesh("model", "info", "--model", str(out), "--threads", "1", "--decode-numerics", "int8")
    assert "decode       int8 activations (model_decode.onnx" in info.stdout
    assert "prefill      exact" in info.stdout
    auto = kvmesh("model", "info", "--model", str(out), "--threads", "1").stdout
    if cpu_flags() >= INT8_DECODE_FLAGS:
        assert "decode       int8 activations (model_decode.onnx" in auto
    else:  # the default falls back to exact decode steps on this CPU, and says why
        assert "decode       exact (fp32 activations) (this CPU has no avx512_vnni" in auto
    forced = kvmesh("model", "info", "--model", str(out), "--threads", "1", "--decode-numerics", "exact")
    assert "decode       exact (fp32 activations)" in forced.stdout
    assert "together     model_group.onnx" in forced.stdout
    assert "up to date" in kvmesh(*args).stdout
    # a folder from before the group graph is upgraded by prepare, its fingerprint kept
    (out / "model_group.onnx").unlink()
    regrouped = kvmesh(*args)
    assert regrouped.returncode == 0 and "up to date" not in regrouped.stdout
    assert ModelFolder.load(out).group_graph is not None and ModelFolder.load(out).fingerprint == exact.fingerprint


def test_model_wait_returns_once_another_process_has_prepared_the_model(real_int4: ModelFolder, tmp_path: Path) -> None:
    """A deployment's pods wait for the model its Job prepares into their shared volume: nothing
    runs before the folder is there and current, then the command given after `--` does."""
    env = {**os.environ, "KVMESH_HOME": str(tmp_path)}
    cmd = [sys.executable, "-m", "kvmesh.cli", "model", "wait", "--timeout-s", "120", "--"]
    waiting = subprocess.Popen(
        [*cmd, sys.executable, "-c", "print('serving')"], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            waiting.wait(timeout=2)  # no model folder yet: still waiting
        (tmp_path / "models").mkdir()
        # what the Job's `kvmesh model prepare` leaves (the real one, renamed into place whole)
        (tmp_path / "models" / real_int4.path.name).symlink_to(real_int4.path)
        out, _ = waiting.communicate(timeout=60)
    finally:
        waiting.kill()
    assert waiting.returncode == 0 and out.splitlines()[-1] == "serving"
    # the folder there was prepared with the int8 decode graph: an exact-decode deployment waits on
    exact = kvmesh("model", "wait", "--exact-decode", "--timeout-s", "1", home=tmp_path)
    _clear_error(exact, "not prepared within 1 s")
    _clear_error(kvmesh("model", "wait", "--timeout-s", "1", home=tmp_path / "empty"), "not prepared within 1 s")


def test_chat_ends_cleanly_at_end_of_input_and_takes_a_session() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "kvmesh.cli", "chat", "--endpoint", "127.0.0.1:1", "--session", "my-session"],
        input="",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr and "session my-session" in r.stderr
