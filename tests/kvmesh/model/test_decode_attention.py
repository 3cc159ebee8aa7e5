"""kvmesh's DecodeAttention kernel (kvmesh/model/ops) against ONNX Runtime's GroupQueryAttention
on the same inputs: one-node graphs at SmolLM2's shape (the AVX-512 path) and others (the generic
path), rows crossing the kernel's 256-token chunks, shared and separate present buffers, refused
inputs; and the real model's decode graph with it: batch-invariant, as the default one is."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from kvmesh.model.convert import convert_gguf
from kvmesh.model.folder import DECODE_GRAPH, ModelFolder
from kvmesh.model.ops import DOMAIN, library, needs_library
from kvmesh.model.prepare import find_default_gguf, prepare
from kvmesh.model.runner import INT8_DECODE_FLAGS, ModelRunner, RunnerConfig, cpu_flags
from kvmesh.model.tokenizer import ChatTokenizer
from tests.kvmesh.model.test_decode_numerics import _greedy_rows, _prompts  # the default graph's own check

pytestmark = pytest.mark.skipif(library() is None, reason="kvmesh's kernel library is not built (scripts/build_ops.sh)")
CAPACITY = 1024


def _session(kind: str, heads: int, kv_heads: int, dim: int) -> ort.InferenceSession:
    freqs = np.outer(np.arange(CAPACITY), 1.0 / (100000 ** (np.arange(0, dim, 2) / dim)))
    inits = [numpy_helper.from_array(np.cos(freqs).astype(np.float32), "cos")]
    inits.append(numpy_helper.from_array(np.sin(freqs).astype(np.float32), "sin"))
    kv = ["B", kv_heads, "C", dim]
    inputs = [helper.make_tensor_value_info("qkv", TensorProto.FLOAT, ["B", "S", (heads + 2 * kv_heads) * dim])]
    inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, kv) for n in ("past_key", "past_value")]
    inputs += [helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["B"])]
    inputs += [helper.make_tensor_value_info("total", TensorProto.INT32, [])]
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["B", "S", heads * dim])]
    outputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("present_key", "present_value")]
    heads_attrs = {"num_heads": heads, "kv_num_heads": kv_heads}
    if kind == "gqa":
        ins = ["qkv", "", "", "past_key", "past_value", "seqlens_k", "total", "cos", "sin"]
        node = helper.make_node(
            "GroupQueryAttention",
            ins,
            ["out", "present_key", "present_value"],
            domain="com.microsoft",
            do_rotary=1,
            **heads_attrs,
        )
    else:
        ins = ["qkv", "past_key", "past_value", "seqlens_k", "total", "cos", "sin"]
        node = helper.make_node(
            "DecodeAttention", ins, ["out", "present_key", "present_value"], domain=DOMAIN, **heads_attrs
        )
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1), helper.make_opsetid(DOMAIN, 1)]
    model = helper.make_model(
        helper.make_graph([node], "a", inputs, outputs, inits), opset_imports=opsets, ir_version=10
    )
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    if kind != "gqa":
        opts.register_custom_ops_library(str(library()))
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _inputs(heads: int, kv_heads: int, dim: int, lengths: list[int], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    b = len(lengths)
    return {
        "qkv": rng.standard_normal((b, 1, (heads + 2 * kv_heads) * dim)).astype(np.float32),
        "past_key": rng.standard_normal((b, kv_heads, CAPACITY, dim)).astype(np.float32),
        "past_value": rng.standard_normal((b, kv_heads, CAPACITY, dim)).astype(np.float32),
        "seqlens_k": np.array([n - 1 for n in lengths], np.int32),
        "total": np.array(max(lengths), np.int32),
    }


def _in_place(sess: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One run with present bound to the past's own memory (as decode slots run): out, keys, values."""
    keys, values = feeds["past_key"].copy(), feeds["past_value"].copy()
    io = sess.io_binding()
    io.bind_output("out")
    for name in ("qkv", "seqlens_k", "total"):
        io.bind_cpu_input(name, feeds[name])
    for past, present, buf in (("past_key", "present_key", keys), ("past_value", "present_value", values)):
        value = ort.OrtValue.ortvalue_from_numpy(buf)
        io.bind_ortvalue_input(past, value)
        io.bind_ortvalue_output(present, value)
    sess.run_with_iobinding(io)
    return io.copy_outputs_to_cpu()[0], keys, values


@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim"),
    [(9, 3, 64), (8, 2, 64), (4, 2, 16), (6, 1, 64)],
    ids=["smollm2-avx512", "group4-avx512", "tiny-generic", "group6-generic"],
)
def test_decode_steps_match_group_query_attention(heads: int, kv_heads: int, dim: int) -> None:
    lengths = [1, 40, 256, 257, 600]  # the kernel cuts rows into 256-token chunks
    feeds = _inputs(heads, kv_heads, dim, lengths)
    want = _in_place(_session("gqa", heads, kv_heads, dim), feeds)
    got = _in_place(_session("kvmesh", heads, kv_heads, dim), feeds)
    np.testing.assert_allclose(got[0], want[0], atol=2e-5, rtol=1e-4)
    for ours, theirs in zip(got[1:], want[1:], strict=True):  # the new token's rotated key and value, in place
        np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=1e-5)
    # a row's result does not depend on its batch mates: each row alone gives the same bits
    for row, n in enumerate(lengths):
        alone = _in_place(
            _session("kvmesh", heads, kv_heads, dim),
            {k: v[row : row + 1] if v.ndim else np.array(n, np.int32) for k, v in feeds.items()},
        )
        np.testing.assert_array_equal(alone[0][0], got[0][row])


def test_a_present_of_its_own_gets_the_past_copied() -> None:
    """Without shared buffers (a plain run) the present holds the past and the new token."""
    lengths = [30, 300]
    feeds = _inputs(9, 3, 64, lengths, seed=1)
    out, keys, values = _session("kvmesh", 9, 3, 64).run(None, feeds)
    ref_out, ref_keys, ref_values = _in_place(_session("gqa", 9, 3, 64), feeds)
    np.testing.assert_allclose(out, ref_out, atol=2e-5, rtol=1e-4)
    for row, n in enumerate(lengths):
        np.testing.assert_allclose(keys[row, :, :n], ref_keys[row, :, :n], atol=1e-5)
        np.testing.assert_allclose(values[row, :, :n], ref_values[row, :, :n], atol=1e-5)


def test_inputs_outside_the_contract_are_refused() -> None:
    sess = _session("kvmesh", 9, 3, 64)
    beyond = _inputs(9, 3, 64, [CAPACITY + 1])
    with pytest.raises(Exception, match="outside the KV buffer"):
        sess.run(None, {**beyond, "total": np.array(CAPACITY, np.int32)})
    two_tokens = _inputs(9, 3, 64, [10])
    two_tokens["qkv"] = np.repeat(two_tokens["qkv"], 2, axis=1)
    with pytest.raises(Exception, match="one new token per row"):
        sess.run(None, two_tokens)


@pytest.fixture(scope="module")
def real_kvmesh(tmp_path_factory: pytest.TempPathFactory) -> ModelFolder:
    out = tmp_path_factory.mktemp("kvmesh-attention") / "smollm2-int4"
    convert_gguf(
        find_default_gguf(), out, "int4", step=lambda _: None, decode_accuracy_level=4, decode_attention="kvmesh"
    )
    return ModelFolder.load(out)


@pytest.mark.skipif(not cpu_flags() >= INT8_DECODE_FLAGS, reason="int8 decode steps run where AVX-512 VNNI is")
def test_the_real_models_decode_graph_with_it_is_batch_invariant(real_kvmesh: ModelFolder) -> None:
    runner = ModelRunner(real_kvmesh, RunnerConfig(threads=2))
    assert runner.decode_numerics.endswith("kvmesh DecodeAttention")
    pre = [runner.prefill(p) for p in _prompts(ChatTokenizer(real_kvmesh), 8)]
    alone = {m: _greedy_rows(runner, pre, [m], 1)[m] for m in range(8)}
    for size in (2, 5, 8):
        members = list(range(8 - size, 8))[::-1]
        together = _greedy_rows(runner, pre, members, 8)
        for m in members:
            np.testing.assert_array_equal(together[m], alone[m], err_msg=f"sequence {m} in a batch of {size}")


def test_prepare_writes_the_decode_attention_asked_for(tiny_gguf_q4: Path, tmp_path: Path) -> None:
    out = tmp_path / "tiny"
    prepare(tiny_gguf_q4, out, "int4", attention="kvmesh")
    folder = ModelFolder.load(out)
    assert folder.meta["decode_attention"] == "kvmesh" and needs_library(out / DECODE_GRAPH)
    runner = ModelRunner(folder, RunnerConfig(threads=1, decode_numerics="int8"))
    assert runner.decode_numerics.endswith(", kvmesh DecodeAttention")
    prepare(tiny_gguf_q4, out, "int4")  # the default again: the folder is converted back
    assert ModelFolder.load(out).meta["decode_attention"] == "gqa" and not needs_library(out / DECODE_GRAPH)
