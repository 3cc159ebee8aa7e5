import dataclasses
import itertools
from collections.abc import AsyncIterator

import numpy as np
import pytest
import xxhash

from kv_transfer.codec import Assembler, Chunk, chunk_count, encode, layout_of
from kvmesh.errors import DataLoss
from kvmesh.model.kv import KVCache

F32, F16 = np.dtype(np.float32), np.dtype(np.float16)


def _kv(tokens: int = 37, layers: int = 3) -> KVCache:
    rng = np.random.default_rng(0)
    shape = (1, 2, tokens, 8)
    return KVCache(
        [rng.standard_normal(shape, np.float32) for _ in range(layers)],
        [rng.standard_normal(shape, np.float32) for _ in range(layers)],
    )


def _receive(kv: KVCache, chunks: list[Chunk], dtype: np.dtype = F32) -> KVCache:
    layout = layout_of(kv, dtype)
    asm = Assembler(layout, chunk_count(layout, 1000))
    for c in chunks:
        asm.add(c)
    return asm.finish()


@pytest.mark.parametrize("chunk_bytes", [1000, 64, 1 << 20])
def test_round_trip_is_exact(chunk_bytes: int) -> None:
    kv = _kv()
    layout = layout_of(kv, F32)
    chunks = list(encode(kv, F32, chunk_bytes))
    assert len(chunks) == chunk_count(layout, chunk_bytes)
    assert all(len(c.data) <= chunk_bytes for c in chunks)
    asm = Assembler(layout, len(chunks))
    for c in chunks:
        asm.add(c)
    out = asm.finish()
    for a, b in zip(out.keys + out.values, kv.keys + kv.values, strict=True):
        np.testing.assert_array_equal(a, b)


def test_fp16_on_the_wire_halves_the_bytes_within_fp16_precision() -> None:
    kv = _kv()
    chunks = list(encode(kv, F16, 1000))
    assert sum(len(c.data) for c in chunks) == layout_of(kv, F32).total_bytes // 2
    layout = layout_of(kv, F16)
    asm = Assembler(layout, chunk_count(layout, 1000))
    for c in chunks:
        asm.add(c)
    out = asm.finish()
    assert out.keys[0].dtype == np.float16  # as the wire carried it; a decode slot converts
    np.testing.assert_allclose(out.values[2], kv.values[2], rtol=1e-3, atol=1e-3)


def test_kv_views_are_sent_as_their_own_tokens() -> None:
    kv = _kv(40).prefix(32)  # a non-contiguous view, as a prefix store hit gives
    out = _receive(kv, list(encode(kv, F32, 1000)))
    np.testing.assert_array_equal(out.keys[1], kv.keys[1])


def test_bad_checksum_is_data_loss() -> None:
    kv = _kv()
    chunks = list(encode(kv, F32, 1000))
    flipped = bytearray(bytes(chunks[3].data))
    flipped[10] ^= 1
    chunks[3] = dataclasses.replace(chunks[3], data=bytes(flipped))
    with pytest.raises(DataLoss, match="checksum"):
        _receive(kv, chunks)


def test_missing_chunk_is_data_loss() -> None:
    kv = _kv()
    chunks = list(encode(kv, F32, 1000))
    with pytest.raises(DataLoss, match="out of order"):
        _receive(kv, chunks[:2] + chunks[3:])


def test_reordered_chunks_are_data_loss() -> None:
    kv = _kv()
    chunks = list(encode(kv, F32, 1000))
    chunks[1], chunks[2] = chunks[2], chunks[1]
    with pytest.raises(DataLoss, match="out of order"):
        _receive(kv, chunks)


def test_short_stream_is_data_loss() -> None:
    kv = _kv()
    with pytest.raises(DataLoss, match="short"):
        _receive(kv, list(encode(kv, F32, 1000))[:-1])


def test_oversized_chunk_is_data_loss() -> None:
    kv = _kv()
    chunks = list(encode(kv, F32, 1000))
    last = chunks[-1]
    chunks[-1] = dataclasses.replace(last, data=bytes(last.data) + b"\0\0\0\0", checksum=0)
    with pytest.raises(DataLoss, match="size"):
        _receive(kv, chunks)


def test_pull_takes_whole_aligned_chunks_in_place() -> None:
    import asyncio

    from kv_transfer.fastwire import ALIGN, encode_chunk_response
    from kv_transfer.wire import layout_to_pb, pull
    from kvmesh.v1 import kv_pb2, prefill_pb2

    kv = _kv()
    layout = layout_of(kv, F32)
    chunks = list(encode(kv, F32, 1 << 20))  # one chunk per layer's keys or values
    messages = [encode_chunk_response(c) for c in chunks]
    header = kv_pb2.KVHeader(layout=layout_to_pb(layout), chunk_count=len(chunks), total_bytes=layout.total_bytes)

    async def stream(drop: int | None = None) -> AsyncIterator[bytes]:
        yield prefill_pb2.PrefillResponse(header=header).SerializeToString()
        for c, m in zip(chunks, messages, strict=True):
            if c.index != drop:
                yield m

    got = asyncio.run(pull(stream()))
    for a, b, m in zip(got.kv.keys + got.kv.values, kv.keys + kv.values, messages[0::2] + messages[1::2], strict=True):
        np.testing.assert_array_equal(a, b)
        assert np.shares_memory(a, np.frombuffer(m, np.uint8))  # the message itself, not a copy
        assert a.ctypes.data % ALIGN == 0
    with pytest.raises(DataLoss, match="out of order"):
        asyncio.run(pull(stream(drop=4)))


def test_a_chunk_spanning_arrays_or_split_within_one_is_copied_right() -> None:
    """Another sender may cut the stream anywhere: pieces are copied into each array's buffer."""
    kv = _kv()
    layout = layout_of(kv, F32)
    flat = np.concatenate([np.stack([k[0], v[0]]) for k, v in zip(kv.keys, kv.values, strict=True)]).reshape(-1)
    raw = flat.view(np.uint8)
    cuts = [0, 100, 2468, 2472, 5000, raw.size]  # arrays are 2,368 bytes: pieces within one and across
    asm = Assembler(layout, len(cuts) - 1)
    for i, (a, b) in enumerate(itertools.pairwise(cuts)):
        data = raw[a:b].tobytes()
        asm.add(Chunk(i, a, data, xxhash.xxh3_64_intdigest(data)))
    out = asm.finish()
    for a, b in zip(out.keys + out.values, kv.keys + kv.values, strict=True):
        np.testing.assert_array_equal(a, b)
