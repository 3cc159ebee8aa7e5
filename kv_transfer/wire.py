"""KV stream messages (kvmesh.v1) to and from the codec's plain values."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from kv_transfer.codec import Assembler, Chunk, Layout
from kv_transfer.fastwire import decode_response
from kvmesh.errors import DataLoss
from kvmesh.model.runner import KVCache
from kvmesh.v1 import kv_pb2, prefill_pb2

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


@dataclass(frozen=True)
class Received:
    header: kv_pb2.KVHeader
    kv: KVCache


def _header(message: kv_pb2.KVHeader | Chunk | None) -> kv_pb2.KVHeader:
    if not isinstance(message, kv_pb2.KVHeader):
        raise DataLoss("KV stream did not start with a header")
    return message


def _chunk(message: kv_pb2.KVHeader | Chunk) -> Chunk:
    if not isinstance(message, Chunk):
        raise DataLoss("a second header inside a KV stream")
    return message


def _assembler(header: kv_pb2.KVHeader, pool: KVPool | None) -> Assembler:
    layout = layout_from_pb(header.layout)
    return Assembler(layout, header.chunk_count, None if pool is None else pool.take(layout.shape))


def receive(responses: Iterable[bytes | prefill_pb2.PrefillResponse], pool: KVPool | None = None) -> Received:
    """A KV stream (a header, then chunks), as serialized or as parsed PrefillResponses,
    reassembled (into a buffer from `pool` when given); DataLoss when it is not whole and right."""
    it = (decode_response(m if isinstance(m, bytes) else m.SerializeToString()) for m in responses)
    header = _header(next(it, None))
    asm = _assembler(header, pool)
    for message in it:
        asm.add(_chunk(message))
    return Received(header, asm.finish())


class KVPool:
    """Reusable receive buffers: one flat float32 array, grown to the largest KV seen. For a
    receiver that is done with each KV before the next arrives (a benchmark, a test); a decode
    node keeps one per running sequence."""

    def __init__(self) -> None:
        self._flat = np.empty(0, np.float32)

    def take(self, shape: tuple[int, ...]) -> np.ndarray:
        size = int(np.prod(shape))
        if self._flat.size < size:
            self._flat = np.empty(size, np.float32)
        return self._flat[:size].reshape(shape)


PREFILL_METHOD = "/kvmesh.v1.Prefill/Prefill"


def prefill_method(channel: grpc.Channel | grpc.aio.Channel) -> Any:
    """Prefill on `channel` with responses left serialized, for `receive` to read in place (the
    generated stub would parse every chunk into a new bytes object first)."""
    return channel.unary_stream(
        PREFILL_METHOD, request_serializer=prefill_pb2.PrefillRequest.SerializeToString, response_deserializer=None
    )


async def read_header(responses: AsyncIterator[bytes]) -> kv_pb2.KVHeader:
    """The first message of a serialized KV stream (it carries the first token)."""
    first = await anext(responses, None)
    return _header(None if first is None else decode_response(first))


async def pull(
    responses: AsyncIterator[bytes], pool: KVPool | None = None, header: kv_pb2.KVHeader | None = None
) -> Received:
    """`receive` for grpc.aio: each chunk is checked and copied in a thread of the loop's default
    executor (owned and shut down with the loop; the copy releases the GIL) while the event loop
    reads the next one, at most one chunk behind; concurrent pulls assemble in parallel. `header`: already
    read from `responses` (read_header), so that `responses` starts at the chunks."""
    loop = asyncio.get_running_loop()
    it = aiter(responses)
    header = header or await read_header(it)
    asm = _assembler(header, pool)
    behind: asyncio.Future[None] | None = None
    async for raw in it:
        chunk = _chunk(decode_response(raw))
        if behind is not None:
            await behind
        behind = loop.run_in_executor(None, asm.add, chunk)
    if behind is not None:
        await behind
    return Received(header, asm.finish())

