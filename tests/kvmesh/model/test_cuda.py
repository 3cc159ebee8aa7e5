"""The CUDA execution provider path (onnxruntime-gpu and a GPU): skipped on machines without
them, as in CI; run on a GPU machine with the rest of the suite (README, "GPU")."""

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from kvmesh.errors import ModelError
from kvmesh.model.batch import ConcatDecoder, DeviceSlots, SlotBatch
from kvmesh.model.folder import ModelFolder
from kvmesh.model.kv import KVCache
from kvmesh.model.reference import ReferenceLlama
from kvmesh.model.runner import ModelRunner, RunnerConfig

pytestmark = pytest.mark.skipif(
    "CUDAExecutionProvider" not in ort.get_available_providers(), reason="no CUDA execution provider here"
)
PROMPT = [258, 72, 101, 108, 108, 111, 260, 44, 32, 119, 111, 114, 108, 100, 33, 257, 10, 261, 262, 263]


def test_a_float32_graph_is_refused_on_cuda_and_runs_on_cpu_by_default(tiny_int4: ModelFolder) -> None:
    with pytest.raises(ModelError, match="float16"):
        ModelRunner(tiny_int4, RunnerConfig(provider="cuda"))
    assert ModelRunner(tiny_int4).device == "cpu"


def test_float16_graph_on_cuda_follows_the_reference(tiny_int4_f16: ModelFolder, tiny_gguf_q4: Path) -> None:
    runner = ModelRunner(tiny_int4_f16, RunnerConfig(provider="cuda", all_logits=True))
    assert runner.device == "cuda"
    ref_logits, _ = ReferenceLlama(tiny_gguf_q4).forward(PROMPT)
    logits, kv = runner.forward(np.array([PROMPT]), KVCache.empty(runner.layout))
    assert kv.keys[0].dtype == np.float16
    assert np.abs(logits[0] - ref_logits).max() <= 0.01 * np.abs(ref_logits).max()
    assert (logits[0].argmax(-1) == ref_logits.argmax(-1)).mean() >= 0.95


def test_decode_slots_live_on_the_device(tiny_int4_f16: ModelFolder) -> None:
    runner = ModelRunner(tiny_int4_f16, RunnerConfig(provider="cuda"))
    batch = SlotBatch(runner, slots=2, capacity=64)
    assert isinstance(batch.kv, DeviceSlots) and batch.kv.buffers[0].device_name() == "cuda"
    logits, kv = runner.prefill(PROMPT)
    batch.add(kv)
    token = int(np.argmax(logits))
    alone = ConcatDecoder(runner, kv, 64)  # host KV fed back each step: none of the slot code
    for _ in range(8):  # the device slots and the plain decoder agree step for step
        a, b = batch.step(np.array([token]))[0], alone.step(token)
        np.testing.assert_allclose(a, b, atol=1e-3)
        token = int(np.argmax(a))
