"""KV stream messages (kvmesh.v1) to and from the codec's plain values."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from kv_transfer.codec import Assembler, Chunk, Layout
from kv_transfer.fastwire import decode_response
from kvmesh.errors import DataLoss
from kvmesh.model.kv import KVCache
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


def _assembler(header: kv_pb2.KVHeader) -> Assembler:
    return Assembler(layout_from_pb(header.layout), header.chunk_count)


def receive(responses: Iterable[bytes | prefill_pb2.PrefillResponse]) -> Received:
    """A KV stream (a header, then chunks), as serialized or as parsed PrefillResponses,
    reassembled; DataLoss when it is not whole and right."""
    it = (decode_response(m if isinstance(m, bytes) else m.SerializeToString()) for m in responses)
    header = _header(next(it, None))
    asm = _assembler(header)
    for message in it:
        asm.add(_chunk(message))
    return Received(header, asm.finish())


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


async def pull(responses: AsyncIterator[bytes], header: kv_pb2.KVHeader | None = None) -> Received:
    """`receive` for grpc.aio. Each chunk is checked and taken on the event loop as it arrives: a
    whole aligned array costs only its checksum (~80 us per 1.7 MB), less than handing it to a
    thread (measured: 101 MB in 64-66 ms inline, 71-79 ms through the default executor; fp16, which
    converts, 108-115 against 127-144). `header`: already read from `responses` (read_header), so
    that `responses` starts at the chunks."""
    it = aiter(responses)
    header = header or await read_header(it)
    asm = _assembler(header)
    async for raw in it:
        asm.add(_chunk(decode_response(raw)))
    return Received(header, asm.finish())
