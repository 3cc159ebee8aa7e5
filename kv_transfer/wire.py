"""KV stream messages (kvmesh.v1) to and from the codec's plain values."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from kv_transfer.codec import Assembler, Chunk, Layout
from kvmesh.errors import DataLoss
from kvmesh.model.runner import KVCache
from kvmesh.v1 import kv_pb2


class HasHeaderOrChunk(Protocol):
    """A message with a oneof `kind` of `header` (KVHeader) or `chunk` (KVChunk), e.g. PrefillResponse."""

    header: kv_pb2.KVHeader
    chunk: kv_pb2.KVChunk

    def WhichOneof(self, name: str) -> str | None: ...


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


@dataclass(frozen=True)
class Received:
    header: kv_pb2.KVHeader
    kv: KVCache


def receive(responses: Iterable[HasHeaderOrChunk]) -> Received:
    """A KV stream (a header, then chunks) reassembled; DataLoss when it is not whole and right."""
    it = iter(responses)
    first = next(it, None)
    if first is None or first.WhichOneof("kind") != "header":
        raise DataLoss("KV stream did not start with a header")
    header = first.header
    asm = Assembler(layout_from_pb(header.layout), header.chunk_count)
    for msg in it:
        if msg.WhichOneof("kind") != "chunk":
            raise DataLoss("a second header inside a KV stream")
        asm.add(chunk_from_pb(msg.chunk))
    return Received(header, asm.finish())
