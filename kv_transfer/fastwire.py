"""The KV chunk messages, written and read by hand in protobuf's wire format.

A PrefillResponse carrying a KVChunk is ~1 MiB of KV and a dozen bytes of framing. The generated
classes cost two extra copies of the KV on each side (the array into a `bytes`, that into the
serialized message; and back). Here the sender copies the array once, straight into the
serialized message, and the receiver reads the KV in place from the bytes gRPC handed it. The
bytes are exactly what protos/kvmesh/v1 defines: any generated client parses them (tests check
both directions against the generated classes); headers and every other message go through the
generated code.

  PrefillResponse { 1: KVHeader header | 2: KVChunk chunk }
  KVChunk { 1: uint32 index, 2: uint64 offset, 3: bytes data, 4: uint64 checksum, 5: bytes align }

We write fields 1, 2, 4, 5, 3 in that order (any order is valid protobuf) with `align` sized so that
data begins at a multiple of ALIGN bytes into the message.
"""

from __future__ import annotations

from kv_transfer.codec import Chunk
from kvmesh.errors import DataLoss
from kvmesh.v1 import kv_pb2, prefill_pb2

_VARINT, _LEN = 0, 2
ALIGN = 16  # CPython's bytes keep their data 16-byte aligned: so is a chunk's, read in place


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _tag(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def encode_chunk_response(chunk: Chunk) -> bytes:
    """A serialized PrefillResponse{chunk}: one copy of chunk.data (bytes or a memoryview), which
    starts ALIGN bytes into the message (an `align` field of padding before it): in place, the
    receiver's view of it is an aligned array."""
    size = len(chunk.data) if isinstance(chunk.data, bytes) else chunk.data.nbytes
    fields = _tag(1, _VARINT) + _varint(chunk.index) + _tag(2, _VARINT) + _varint(chunk.offset)
    fields += _tag(4, _VARINT) + _varint(chunk.checksum)
    data_tag = _tag(3, _LEN) + _varint(size)
    for pad in range(2 * ALIGN):  # the outer length's varint may grow a byte as the padding does
        align = _tag(5, _LEN) + _varint(pad) + bytes(pad)
        inner = len(fields) + len(align) + len(data_tag) + size
        head = _tag(2, _LEN) + _varint(inner) + fields + align + data_tag
        if len(head) % ALIGN == 0:
            break
    return b"".join((head, chunk.data))


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise DataLoss("truncated or malformed KV message")
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not byte & 0x80:
            return value, pos


def decode_response(raw: bytes) -> kv_pb2.KVHeader | Chunk:
    """A serialized PrefillResponse -> its header, or its chunk with data a view into raw."""
    buf = memoryview(raw)
    if not buf or buf[0] != (2 << 3 | _LEN):
        msg = prefill_pb2.PrefillResponse.FromString(raw)
        if msg.WhichOneof("kind") == "chunk":
            c = msg.chunk
            return Chunk(c.index, c.offset, c.data, c.checksum)
        if msg.WhichOneof("kind") != "header":
            raise DataLoss("empty message in a KV stream")
        return msg.header
    size, pos = _read_varint(buf, 1)
    if pos + size != len(buf):
        raise DataLoss("KV chunk message has a wrong length")
    fields: dict[int, int] = {}
    data = memoryview(b"")
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        field, wire_type = key >> 3, key & 7
        if wire_type == _VARINT:
            fields[field], pos = _read_varint(buf, pos)
        elif wire_type == _LEN:
            length, pos = _read_varint(buf, pos)
            if field == 3:
                data = buf[pos : pos + length]
            pos += length
        else:
            raise DataLoss(f"KV chunk has a field of wire type {wire_type}")
    if pos != len(buf):
        raise DataLoss("KV chunk message overruns its length")
    return Chunk(fields.get(1, 0), fields.get(2, 0), data, fields.get(4, 0))
