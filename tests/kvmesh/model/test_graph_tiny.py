"""The ONNX graph against the numpy reference (llama.cpp semantics, GGUF row order) on the tiny
model, and split equivalence: the property the whole prefix cache rests on."""

from pathlib import Path

import numpy as np
import pytest

from kvmesh.errors import ResourceExhausted
from kvmesh.model.batch import ConcatDecoder, SharedBufferDecoder, decode_loop
from kvmesh.model.folder import ModelFolder
from kvmesh.model.kv import KVCache
from kvmesh.model.reference import KV, ReferenceLlama
from kvmesh.model.runner import ModelRunner, RunnerConfig

PROMPT = [258, 72, 101, 108, 108, 111, 260, 44, 32, 119, 111, 114, 108, 100, 33, 257, 10, 261, 262, 263]
TOL = 1e-4


def _runner(folder: ModelFolder, all_logits: bool = True) -> ModelRunner:
    return ModelRunner(folder, RunnerConfig(threads=1, all_logits=all_logits))


def _assert_kv(kv: KVCache, ref: ReferenceLlama, ref_kv: KV) -> None:
    for i, (k, v) in enumerate(ref_kv):
        np.testing.assert_allclose(kv.keys[i][0], ref.key_in_hf_order(k), atol=TOL)
        np.testing.assert_allclose(kv.values[i][0], v, atol=TOL)


@pytest.mark.parametrize("variant", ["fp32", "int4"])
def test_prefill_and_decode_match_reference(variant: str, request: pytest.FixtureRequest) -> None:
    folder: ModelFolder = request.getfixturevalue(f"tiny_{variant}")
    gguf: Path = request.getfixturevalue("tiny_gguf_f32" if variant == "fp32" else "tiny_gguf_q4")
    ref, runner = ReferenceLlama(gguf), _runner(folder)
    ref_logits, ref_kv = ref.forward(PROMPT)
    logits, kv = runner.forward(np.array([PROMPT]), KVCache.empty(runner.layout))
    np.testing.assert_allclose(logits[0], ref_logits, atol=TOL)
    _assert_kv(kv, ref, ref_kv)
    for token in (5, 77, 261):  # decode steps, each on the KV the previous one returned
        ref_logits, ref_kv = ref.forward([token], ref_kv)
        logits, kv = runner.forward(np.array([[token]]), kv)
        np.testing.assert_allclose(logits[0], ref_logits, atol=TOL)
    _assert_kv(kv, ref, ref_kv)


def test_every_split_equals_the_full_run(tiny_fp32: ModelFolder) -> None:
    runner = _runner(tiny_fp32)
    full_logits, full_kv = runner.forward(np.array([PROMPT]), KVCache.empty(runner.layout))
    for k in range(1, len(PROMPT)):
        _, head_kv = runner.forward(np.array([PROMPT[:k]]), KVCache.empty(runner.layout))
        logits, kv = runner.forward(np.array([PROMPT[k:]]), head_kv)
        np.testing.assert_allclose(logits[0], full_logits[0, k:], atol=TOL, err_msg=f"split at {k}")
        for a, b in zip(kv.keys + kv.values, full_kv.keys + full_kv.values, strict=True):
            np.testing.assert_allclose(a, b, atol=TOL, err_msg=f"split at {k}")


def test_prefix_of_a_cache_is_a_valid_past(tiny_fp32: ModelFolder) -> None:
    """KV cut back to k tokens (what a prefix store keeps) continues like a fresh k-token run."""
    runner = _runner(tiny_fp32)
    _, kv = runner.forward(np.array([PROMPT]), KVCache.empty(runner.layout))
    logits, _ = runner.forward(np.array([PROMPT[8:]]), kv.prefix(8))
    full, _ = runner.forward(np.array([PROMPT]), KVCache.empty(runner.layout))
    np.testing.assert_allclose(logits[0], full[0, 8:], atol=TOL)


@pytest.mark.parametrize("variant", ["fp32", "int4"])
def test_serving_graph_gives_the_last_logits_of_the_full_graph(variant: str, request: pytest.FixtureRequest) -> None:
    folder: ModelFolder = request.getfixturevalue(f"tiny_{variant}")
    assert folder.last_graph is not None
    full, serving = _runner(folder), _runner(folder, all_logits=False)
    assert serving.graph == folder.last_graph
    logits_all, kv_all = full.forward(np.array([PROMPT]), KVCache.empty(full.layout))
    last, kv = serving.prefill(PROMPT)
    np.testing.assert_allclose(last, logits_all[0, -1], atol=1e-5)
    np.testing.assert_array_equal(kv.keys[-1], kv_all.keys[-1])


def test_float16_graph_follows_the_reference_within_half_precision(
    tiny_int4_f16: ModelFolder, tiny_gguf_q4: Path
) -> None:
    """The CUDA graph (float16 activations and KV), run here on CPU: same weights, same ops."""
    ref, runner = ReferenceLlama(tiny_gguf_q4), _runner(tiny_int4_f16)
    assert runner.layout.dtype == np.float16
    ref_logits, ref_kv = ref.forward(PROMPT)
    logits, kv = runner.forward(np.array([PROMPT]), KVCache.empty(runner.layout))
    assert logits.dtype == np.float32 and kv.keys[0].dtype == np.float16
    scale = np.abs(ref_logits).max()
    assert np.abs(logits[0] - ref_logits).max() <= 0.01 * scale  # measured: ~0.2%
    assert (logits[0].argmax(-1) == ref_logits.argmax(-1)).all()
    for i, (k, v) in enumerate(ref_kv):
        np.testing.assert_allclose(kv.keys[i][0], ref.key_in_hf_order(k), atol=0.02, rtol=0.01)
        np.testing.assert_allclose(kv.values[i][0], v, atol=0.02, rtol=0.01)


def test_layout_is_read_from_the_graph(tiny_fp32: ModelFolder) -> None:
    layout = _runner(tiny_fp32).layout
    assert (layout.layers, layout.kv_heads, layout.head_dim) == (2, 2, 16)
    assert layout.bytes_per_token == 2 * 2 * 2 * 16 * 4


@pytest.mark.parametrize("variant", ["fp32", "int4", "int4_f16"])
def test_shared_buffer_decoder_equals_feeding_present_back(variant: str, request: pytest.FixtureRequest) -> None:
    folder: ModelFolder = request.getfixturevalue(f"tiny_{variant}")
    runner = _runner(folder, all_logits=False)
    logits, kv = runner.prefill(PROMPT)
    shared, concat = decode_loop(runner, kv, len(PROMPT) + 6), ConcatDecoder(runner, kv, len(PROMPT) + 6)
    assert isinstance(shared, SharedBufferDecoder)
    token = int(np.argmax(logits))
    for _ in range(6):
        a, b = shared.step(token), concat.step(token)
        np.testing.assert_allclose(a, b, atol=1e-5)
        token = int(np.argmax(a))
    for x, y in zip(shared.kv().keys + shared.kv().values, concat.kv().keys + concat.kv().values, strict=True):
        np.testing.assert_allclose(x, y, atol=1e-6)
    with pytest.raises(ResourceExhausted):
        shared.step(token)
