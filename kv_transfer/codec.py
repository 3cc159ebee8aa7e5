"""The KV of one sequence to and from a stream of byte chunks.

The stream carries one C-order array (layers, 2 [key, value], kv_heads, tokens, head_dim): layer
0's keys, layer 0's values, layer 1's keys... Each chunk is the next byte range of it, with an
xxh3_64 checksum; ours never spans two layers' arrays. The receiver takes a chunk that is a whole
array in place (no copy) and copies any other piece into that array's buffer; it refuses, with
DataLoss, a chunk out of order, a wrong size, a bad checksum or a stream that ends short: never a
wrong KV.

CHUNK_BYTES: 4 MiB less 1 KiB, so a chunk and its framing fit gRPC's default 4 MiB message limit
(any client can read the stream with default settings). Measured with bench/prefix_cache.py
(101 MB of SmolLM2 KV over loopback, warm store): 256 KiB chunks 81 ms, 1 MiB 65-75 ms, 4 MiB
60-64 ms; per-message costs dominate below 1 MiB. One message per KV is ~5x slower (DESIGN.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import xxhash

from kvmesh.errors import DataLoss, InvalidArgument
from kvmesh.model.kv import KVCache, KVLayout

CHUNK_BYTES = (4 << 20) - 1024
WIRE_DTYPES: dict[str, np.dtype] = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16)}


@dataclass(frozen=True)
class Layout:
    """What a receiver must know before the first chunk."""

    layers: int
    kv_heads: int
    head_dim: int
    tokens: int
    dtype: np.dtype  # on the wire

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        return (self.layers, 2, self.kv_heads, self.tokens, self.head_dim)

    @property
    def total_bytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize


@dataclass(frozen=True)
class Chunk:
    index: int
    offset: int
    data: bytes | memoryview  # a view into the array (sending) or into the received message
    checksum: int


def check_same_model(fingerprint: str, layout: Layout, own_fingerprint: str, own: KVLayout) -> None:
    """A peer's KV must be this very model's (fingerprint) in its layout, else DataLoss."""
    if fingerprint != own_fingerprint:
        raise DataLoss(f"KV of another model ({fingerprint[:64]!r})")
    if (layout.layers, layout.kv_heads, layout.head_dim) != (own.layers, own.kv_heads, own.head_dim):
        raise DataLoss(f"KV layout {layout.layers}x{layout.kv_heads}x{layout.head_dim} is not this model's")


def check_sizes(layout: Layout, total_bytes: int, chunks: int) -> None:
    """A header's sizes must follow from its layout (a chunk holds >= 16 bytes, never spans two
    arrays), before anything is allocated for them, else DataLoss."""
    if total_bytes != layout.total_bytes or not 0 < chunks <= layout.total_bytes // 16 + 2 * layout.layers:
        raise DataLoss(f"KV sizes do not follow from the layout ({total_bytes} bytes, {chunks} chunks)")


def layout_of(kv: KVCache, wire_dtype: np.dtype) -> Layout:
    k = kv.keys[0]
    if k.shape[0] != 1:
        raise InvalidArgument("a KV stream carries one sequence")
    return Layout(len(kv.keys), int(k.shape[1]), int(k.shape[3]), int(k.shape[2]), wire_dtype)


def encode(kv: KVCache, wire_dtype: np.dtype, chunk_bytes: int = CHUNK_BYTES) -> Iterator[Chunk]:
    """Chunks of the layout's array, at most chunk_bytes each and never across two layers'
    arrays. Each chunk's data is a view into the runner's array (no copy unless the array is not
    contiguous or fp16 is asked for): valid while the KV lives."""
    index, offset = 0, 0
    for k, v in zip(kv.keys, kv.values, strict=True):
        for array in (k, v):
            flat = np.ascontiguousarray(array, dtype=wire_dtype).reshape(-1).view(np.uint8)
            for pos in range(0, flat.size, chunk_bytes):
                data = flat[pos : pos + chunk_bytes].data
                yield Chunk(index, offset, data, xxhash.xxh3_64_intdigest(data))
                index, offset = index + 1, offset + data.nbytes


def chunk_count(layout: Layout, chunk_bytes: int) -> int:
    """How many chunks encode() makes: per array, ceil(array bytes / chunk_bytes)."""
    per_array = layout.total_bytes // (2 * layout.layers)
    return 2 * layout.layers * -(-per_array // chunk_bytes)


class Assembler:
    """Receives chunks in order and hands out the KV as per-layer arrays of the wire's dtype (the
    receiver's one copy, into wherever it keeps the KV, a decode slot, converts if its model's KV
    type differs). A chunk that is one whole array, aligned in its message (kvmesh's sender makes
    it so: fastwire), becomes that array in place. Other pieces (an array split over chunks, a
    misaligned message) are copied into that array's own buffer, allocated once."""

    def __init__(self, layout: Layout, chunk_count: int) -> None:
        if layout.dtype not in WIRE_DTYPES.values():
            raise DataLoss(f"unsupported KV dtype on the wire: {layout.dtype}")
        self.layout = layout
        self.chunk_count = chunk_count
        self._array_bytes = layout.total_bytes // (2 * layout.layers)  # one layer's keys or values
        self._shape = (1, layout.kv_heads, layout.tokens, layout.head_dim)
        self._arrays: list[np.ndarray | None] = [None] * (2 * layout.layers)  # keys 0, values 0, keys 1...
        self._next_index = 0
        self._next_offset = 0

    def add(self, chunk: Chunk) -> None:
        if chunk.index != self._next_index or chunk.offset != self._next_offset:
            raise DataLoss(
                f"KV chunk {chunk.index} at byte {chunk.offset} is out of order "
                f"(expected {self._next_index} at {self._next_offset})"
            )
        size, item = memoryview(chunk.data).nbytes, self.layout.dtype.itemsize
        if size == 0 or size % item or self._next_offset + size > self.layout.total_bytes:
            raise DataLoss(f"KV chunk {chunk.index} has a wrong size ({size} bytes)")
        if xxhash.xxh3_64_intdigest(chunk.data) != chunk.checksum:
            raise DataLoss(f"KV chunk {chunk.index} fails its checksum")
        data = np.frombuffer(chunk.data, dtype=self.layout.dtype)
        pos = self._next_offset
        while data.size:  # the pieces of this chunk, one per array it covers
            a, within = divmod(pos, self._array_bytes)
            n = min(data.size, (self._array_bytes - within) // item)
            piece, data = data[:n], data[n:]
            whole = within == 0 and piece.nbytes == self._array_bytes
            if whole and piece.flags.aligned:
                self._arrays[a] = piece.reshape(self._shape)  # in place: the message stays alive with it
            else:
                target = self._arrays[a]
                if target is None:
                    target = self._arrays[a] = np.empty(self._shape, self.layout.dtype)
                target.reshape(-1)[within // item : within // item + n] = piece  # a view: lands in target
            pos += piece.nbytes
        self._next_index += 1
        self._next_offset += size

    def finish(self) -> KVCache:
        if self._next_offset != self.layout.total_bytes or self._next_index != self.chunk_count:
            raise DataLoss(
                f"KV stream ended short: {self._next_offset} of {self.layout.total_bytes} bytes, "
                f"{self._next_index} of {self.chunk_count} chunks"
            )
        arrays = [np.empty(self._shape, self.layout.dtype) if a is None else a for a in self._arrays]  # None: 0 tokens
        return KVCache(arrays[0::2], arrays[1::2])
