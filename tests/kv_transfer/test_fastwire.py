"""The hand-framed chunk messages are exactly the .proto's: checked against the generated code."""

import numpy as np
import pytest

from kv_transfer.codec import Chunk
from kv_transfer.fastwire import decode_response, encode_chunk_response
from kvmesh.errors import DataLoss
from kvmesh.v1 import kv_pb2, prefill_pb2

DATA = np.arange(1000, dtype=np.float32).view(np.uint8)


@pytest.mark.parametrize(("index", "offset", "checksum"), [(0, 0, 0), (1, 4096, 2**64 - 1), (300, 2**40, 12345)])
def test_generated_code_parses_what_we_write(index: int, offset: int, checksum: int) -> None:
    raw = encode_chunk_response(Chunk(index, offset, DATA.data, checksum))
    msg = prefill_pb2.PrefillResponse.FromString(raw)
    assert msg.WhichOneof("kind") == "chunk"
    assert (msg.chunk.index, msg.chunk.offset, msg.chunk.checksum) == (index, offset, checksum)
    assert msg.chunk.data == DATA.tobytes()


@pytest.mark.parametrize(("index", "offset", "checksum"), [(0, 0, 0), (7, 123, 2**63 + 5)])
def test_we_read_what_generated_code_writes(index: int, offset: int, checksum: int) -> None:
    chunk = kv_pb2.KVChunk(index=index, offset=offset, data=DATA.tobytes(), checksum=checksum)
    got = decode_response(prefill_pb2.PrefillResponse(chunk=chunk).SerializeToString())
    assert isinstance(got, Chunk)
    assert (got.index, got.offset, got.checksum, bytes(got.data)) == (index, offset, checksum, DATA.tobytes())


def test_header_goes_through_the_generated_code() -> None:
    header = kv_pb2.KVHeader(model_fingerprint="m", cached_tokens=16, first_token=5, chunk_count=3)
    assert decode_response(prefill_pb2.PrefillResponse(header=header).SerializeToString()) == header


@pytest.mark.parametrize("cut", [1, 5, 20, -3])
def test_truncated_chunk_is_data_loss(cut: int) -> None:
    raw = encode_chunk_response(Chunk(1, 2, DATA.data, 3))
    with pytest.raises(DataLoss):
        decode_response(raw[:cut])
