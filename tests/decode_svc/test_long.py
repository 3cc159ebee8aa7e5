"""Sequences as long as the model's context on a decode node with its default settings, KV memory
that follows the tokens held, and a KV budget that refuses, never crashes."""

import os
import threading

import grpc
import numpy as np
import pytest

from decode_svc.config import DecodeConfig
from kvmesh.model.batch import SlotBatch
from kvmesh.model.convert import convert_gguf
from kvmesh.model.folder import ModelFolder
from kvmesh.model.runner import ModelRunner, RunnerConfig
from kvmesh.model.tiny import write_tiny_gguf
from kvmesh.v1 import decode_pb2, decode_pb2_grpc, stream_pb2
from tests.helpers.servers import MakeServer

DEFAULTS = {"slots": DecodeConfig.slots, "slot_tokens": DecodeConfig.slot_tokens}  # conftest's base is smaller


@pytest.fixture(scope="module")
def tiny_8k(tmp_path_factory: pytest.TempPathFactory) -> ModelFolder:
    d = tmp_path_factory.mktemp("tiny8k")
    gguf = write_tiny_gguf(d / "tiny-8k.gguf", seed=5, context=8192)
    return ModelFolder.load(convert_gguf(gguf, d / "tiny-8k", "fp32", step=lambda _: None))


def _prompt(n: int, seed: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(3, 250, n)]


def _decode(address: str, prompt: list[int], prefill: str, new: int) -> tuple[int, str]:
    """-> (tokens made, the status code's name)."""
    stub = decode_pb2_grpc.DecodeStub(grpc.insecure_channel(address))
    params = stream_pb2.GenerationParams(max_tokens=new, ignore_eos=True)
    made = 0
    try:
        for ev in stub.Decode(
            decode_pb2.DecodeRequest(tokens=prompt, prefill_node=prefill, params=params), timeout=120
        ):
            made += ev.HasField("token")
    except grpc.RpcError as e:
        return made, e.code().name  # type: ignore[attr-defined]
    return made, "OK"


def test_a_6000_token_prompt_and_1000_new_tokens_with_the_defaults(tiny_8k: ModelFolder, servers: MakeServer) -> None:
    p, d = servers("prefill", tiny_8k), servers("decode", tiny_8k, **DEFAULTS)
    assert _decode(d.address, _prompt(6000, 1), p.address, 1000) == (1000, "OK")


def test_long_sequences_beyond_the_kv_budget_are_refused_and_the_node_keeps_serving(
    tiny_8k: ModelFolder, servers: MakeServer
) -> None:
    """8 at once of 6,000 + 1,000 tokens against the default budget of 40,960: 5 fit."""
    p, d = servers("prefill", tiny_8k), servers("decode", tiny_8k, **DEFAULTS)
    results: list[tuple[int, str]] = []
    threads = [
        threading.Thread(target=lambda i=i: results.append(_decode(d.address, _prompt(6000, i), p.address, 1000)))
        for i in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    codes = sorted(code for _, code in results)
    assert len(codes) == 8 and set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}
    assert codes.count("OK") >= 5 and "RESOURCE_EXHAUSTED" in codes
    assert all(made == 1000 for made, code in results if code == "OK")
    assert _decode(d.address, _prompt(3000, 99), p.address, 50) == (50, "OK")


def _resident() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_slot_memory_follows_the_tokens_held(tiny_8k: ModelFolder) -> None:
    """Reserved for the whole context, resident only for the warm tokens at first; a long join
    faults in what it needs; a freed slot gives it back once the slots hold more than the budget."""
    runner = ModelRunner(tiny_8k, RunnerConfig(threads=1))
    per_token = runner.layout.bytes_per_token
    _, kv = runner.prefill(_prompt(5000, 3))
    before = _resident()
    batch = SlotBatch(runner, 4, 8192, warm_tokens=256, budget_tokens=4096)
    at_rest = _resident() - before
    assert 0.9 * 4 * 256 * per_token <= at_rest <= 4 * 1024 * per_token  # not 4 x 8,192
    batch.add(kv)
    grown = _resident() - before - at_rest
    assert grown >= 0.9 * (5000 - 256) * per_token
    kept = batch.read(0)
    assert np.array_equal(kept.keys[-1], kv.keys[-1]) and np.array_equal(kept.values[0], kv.values[0])
    assert batch.kv.resident_tokens == 5001 + 3 * 256  # type: ignore[union-attr]
    batch.remove(0)  # 5,001 + 3 x 256 tokens resident > the budget of 4,096: given back
    assert batch.kv.resident_tokens == 4 * 256  # type: ignore[union-attr]
    assert _resident() - before <= at_rest + 0.1 * 5000 * per_token + (1 << 20)  # 1 MiB: the allocator's own
    assert batch.add(kv) == 0 and np.array_equal(batch.read(0).keys[0], kv.keys[0])


def test_config_defaults_admit_the_whole_context() -> None:
    assert DecodeConfig().slot_tokens == 0 and DecodeConfig().kv_budget_tokens >= 8192
