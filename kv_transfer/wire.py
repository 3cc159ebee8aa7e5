"""KV stream messages (kvmesh.v1) to and from the codec's plain values."""

from __future__ import annotations

import numpy as np

from kv_transfer.codec import Chunk, Layout
from kvmesh.errors import DataLoss
from kvmesh.v1 import kv_pb2

_TO_WIRE: dict[np.dtype, kv_pb2.KVDtype.ValueType] = {
    np.dtype(np.float32): kv_pb2.KV_DTYPE_FLOAT32,
    np.dtype(np.float16): kv_pb2.KV_DTYPE_FLOAT16,
}
_FROM_WIRE: dict[int, np.dtype] = {int(v): k for k, v in _TO_WIRE.items()}


def wire_dtype(value: int, default: np.dtype) -> np.dtype:
    """A requested KVDtype; UNSPECIFIED means the sender's own."""
    return default if value == kv_pb2.KV_DTYPE_UNSPECIFIED else _FROM_WIRE.get(value, default)


def layout_to_pb(layout: Layout) -> kv_pb2.KVLayout:
    return kv_pb2.KVLayout(
        layers=layout.layers,
        kv_heads=layout.kv_heads,
        head_dim=layout.head_dim,
        dtype=_TO_WIRE[layout.dtype],
        tokens=layout.tokens,
    )


def layout_from_pb(msg: kv_pb2.KVLayout) -> Layout:
    if msg.dtype not in _FROM_WIRE:
        raise DataLoss(f"KV header names an unknown dtype {msg.dtype}")
    return Layout(msg.layers, msg.kv_heads, msg.head_dim, msg.tokens, _FROM_WIRE[msg.dtype])


def chunk_to_pb(chunk: Chunk) -> kv_pb2.KVChunk:
    return kv_pb2.KVChunk(index=chunk.index, offset=chunk.offset, data=chunk.data, checksum=chunk.checksum)


def chunk_from_pb(msg: kv_pb2.KVChunk) -> Chunk:
    return Chunk(msg.index, msg.offset, msg.data, msg.checksum)
