"""What a decode step must read, and how fast this machine reads: the floor a step is held to.

A one-token decode step reads every weight matrix once (MatMulNBits blocks, scales, zero points,
the 8-bit output projection), one row of the embedding and of the rotary tables, and the KV of the
whole context; at one stream it is memory-bound, so (bytes read) / (read bandwidth) is its floor.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx

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
