"""What a decode step must read, and how fast this machine reads: the floor a step is held to.

A one-token decode step reads every weight matrix once (MatMulNBits blocks, scales, zero points,
the 8-bit output projection), one row of the embedding and of the rotary tables, and the KV of the
whole context; at one stream it is memory-bound, so (bytes read) / (read bandwidth) is its floor.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx

from kvmesh.model.ops import DOMAIN, library

# Read one row per step, not the whole table (embedding lookup, rotary caches)
_ROW_READERS = {"Gather", "GatherBlockQuantized", "GroupQueryAttention"}


def _bytes(t: onnx.TensorProto) -> int:
    external = {e.key: e.value for e in t.external_data}
    if "length" in external:
        return int(external["length"])
    if t.raw_data:
        return len(t.raw_data)
    return int(np.prod(t.dims)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def graph_weight_bytes(graph: Path) -> int:
    """Bytes of the initializers a decode step reads whole (those only row-read are left out)."""
    g = onnx.load(str(graph), load_external_data=False).graph
    readers: dict[str, set[str]] = {}
    for node in g.node:
        for name in node.input:
            readers.setdefault(name, set()).add(node.op_type)
    return sum(_bytes(t) for t in g.initializer if readers.get(t.name) and not readers[t.name] <= _ROW_READERS)


def kv_bytes_per_token(folder: Path) -> int:
    """Bytes of KV one token adds, every layer (SmolLM2 fp32: 46,080), from the folder's layout."""
    import json

    from kvmesh.model.kv import KVLayout

    lay = json.loads((folder / "kvmesh.json").read_text())["layout"]
    return KVLayout(lay["layers"], lay["kv_heads"], lay["head_dim"], np.dtype(lay["dtype"])).bytes_per_token


def read_bandwidth(size: int = 1 << 30, threads: int = 2, repeats: int = 5) -> float:
    """Bytes/s of `threads` threads each summing its share of a touched `size`-byte array (numpy
    releases the GIL in the reduction); the best of `repeats`."""
    data = np.ones(size // 8, np.float64)
    parts = np.array_split(data, threads)
    best = 0.0
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            t = time.perf_counter()
            list(pool.map(np.sum, parts))
            best = max(best, size / (time.perf_counter() - t))
    return best


def attention_graph(graph: Path, capacity: int) -> onnx.ModelProto:
    """The decode graph's attention nodes alone (GroupQueryAttention, or kvmesh's DecodeAttention),
    same attributes, one per layer, over KV buffers of `capacity` tokens: what attention costs a
    step, apart from the weights.
    Inputs: qkv (B, 1, (heads + 2 kv_heads) * head_dim) packed as the model's projection writes
    it, seqlens_k (B,), total_sequence_length (), past.i.key|value (B, kv_heads, capacity, head_dim)."""
    from onnx import TensorProto, helper

    g = onnx.load(str(graph), load_external_data=False).graph
    attn = [n for n in g.node if n.op_type in ("GroupQueryAttention", "DecodeAttention")]
    attrs = {a.name: helper.get_attribute_value(a) for a in attn[0].attribute}
    heads, kv_heads = int(attrs["num_heads"]), int(attrs["kv_num_heads"])
    ours = attn[0].op_type == "DecodeAttention"  # its inputs: GQA's without the empty key and value
    past = next(i for i in g.input if i.name == attn[0].input[1 if ours else 3])
    head_dim = past.type.tensor_type.shape.dim[3].dim_value
    dtype = past.type.tensor_type.elem_type
    np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
    # rotary tables (capacity, head_dim / 2): their values do not change the cost
    angles = np.outer(np.arange(capacity), np.ones(head_dim // 2))
    tables = [
        helper.make_tensor(n, dtype, angles.shape, f(angles).astype(np_dtype).ravel())
        for n, f in (("cos", np.cos), ("sin", np.sin))
    ]
    inputs = [
        helper.make_tensor_value_info("qkv", dtype, ["B", 1, (heads + 2 * kv_heads) * head_dim]),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["B"]),
        helper.make_tensor_value_info("total", TensorProto.INT32, []),
    ]
    nodes, outputs = [], []
    for i in range(len(attn)):
        names = [f"past.{i}.key", f"past.{i}.value"]
        inputs += [helper.make_tensor_value_info(n, dtype, ["B", kv_heads, capacity, head_dim]) for n in names]
        outs = [f"out.{i}", f"present.{i}.key", f"present.{i}.value"]
        packed = [] if ours else ["", ""]
        ins = ["qkv", *packed, *names, "seqlens_k", "total", "cos", "sin"]
        nodes.append(helper.make_node(attn[0].op_type, ins, outs, domain=attn[0].domain, **attrs))
        outputs += [helper.make_tensor_value_info(n, dtype, None) for n in outs]
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(attn[0].domain, 1)]
    return helper.make_model(helper.make_graph(nodes, "attention", inputs, outputs, tables), opset_imports=opsets)


def attention_ms(graph: Path, batch: int, context: int, threads: int = 2, steps: int = 20) -> float:
    """Milliseconds of one step's attention, every layer: `batch` rows attending over `context`
    tokens each, past and present bound to the same buffers (as SlotBatch binds them); the median
    of `steps` after a warm-up."""
    import onnxruntime as ort

    capacity = context + 1
    model = attention_graph(graph, capacity)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    if any(o.domain == DOMAIN for o in model.opset_import):
        opts.register_custom_ops_library(str(library()))
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    qkv_type = model.graph.input[0].type.tensor_type
    dtype = onnx.helper.tensor_dtype_to_np_dtype(qkv_type.elem_type)
    rng = np.random.default_rng(0)
    io = session.io_binding()
    qkv = rng.standard_normal((batch, 1, qkv_type.shape.dim[2].dim_value)).astype(dtype)
    io.bind_cpu_input("qkv", qkv)
    io.bind_cpu_input("seqlens_k", np.full(batch, context, np.int32))  # context + the new token, - 1
    io.bind_cpu_input("total", np.array(capacity, np.int32))
    buffers = []  # the bound KV: held here while the session reads and writes it by address
    for inp in model.graph.input[3:]:
        shape = [batch, *(d.dim_value for d in inp.type.tensor_type.shape.dim[1:])]
        buf = rng.standard_normal(shape).astype(dtype)
        buffers.append(buf)
        io.bind_input(inp.name, "cpu", 0, dtype, shape, buf.ctypes.data)
        io.bind_output(inp.name.replace("past", "present"), "cpu", 0, dtype, shape, buf.ctypes.data)
    for out in model.graph.output[0::3]:
        io.bind_output(out.name)
    return _median_ms(lambda: session.run_with_iobinding(io), steps)


def batch_step_ms(folder: Path, batch: int, context: int, exact: bool, threads: int = 2, steps: int = 20) -> float:
    """Milliseconds of one decode step of the engine alone (SlotBatch, no services): `batch`
    sequences of `context` tokens (KV of random values: a step's cost does not depend on them);
    the median of `steps` after a warm-up."""
    from kvmesh.model.batch import SlotBatch
    from kvmesh.model.folder import ModelFolder
    from kvmesh.model.kv import KVCache
    from kvmesh.model.runner import ModelRunner, RunnerConfig

    config = RunnerConfig(threads=threads, provider="cpu", decode_numerics="exact" if exact else "auto")
    runner = ModelRunner(ModelFolder.load(folder), config)
    lay, rng = runner.layout, np.random.default_rng(0)
    slots = SlotBatch(runner, batch, context + steps + 8)
    shape = (1, lay.kv_heads, context, lay.head_dim)
    for _ in range(batch):
        parts = [[rng.standard_normal(shape).astype(lay.dtype) for _ in range(lay.layers)] for _ in range(2)]
        slots.add(KVCache(*parts))
    tokens = np.full(batch, 100, np.int64)
    return _median_ms(lambda: slots.step(tokens), steps)


def _median_ms(run: Callable[[], object], steps: int, warmup: int = 3) -> float:
    """Median milliseconds of `steps` calls of `run`, after `warmup` calls."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return float(np.median(times)) * 1000
