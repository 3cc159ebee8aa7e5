"""The prefix block-key chain, shared by the prefill store and the proxy's router.

Tokens are cut into blocks of `block_size`; only full blocks have keys. Block i's key is
blake2b-128(key of block i-1 || its tokens as little-endian int32), and the chain is rooted in
blake2b-128 of the model fingerprint (weights, tokenizer, KV layout), the block size and the
tenant's cache salt. A cryptographic hash, not Python's hash() or a fast non-cryptographic one:
a crafted collision would let one prompt poison another's cache. Different salts share no key, so
a tenant never hits (or times) another tenant's prompt.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

import numpy as np

KEY_BYTES = 16


def root_key(fingerprint: str, block_size: int, salt: bytes = b"") -> bytes:
    h = hashlib.blake2b(digest_size=KEY_BYTES, person=b"kvmesh-root")
    h.update(fingerprint.encode())
    h.update(struct.pack("<II", block_size, len(salt)))
    h.update(salt)
    return h.digest()


def block_keys(root: bytes, tokens: Sequence[int], block_size: int) -> list[bytes]:
    """Keys of every full block of `tokens`, in order: keys[i] covers tokens[: (i+1)*block_size]."""
    full = len(tokens) // block_size
    data = np.asarray(tokens[: full * block_size], dtype="<i4").tobytes()
    keys, parent, step = [], root, block_size * 4
    for i in range(full):
        h = hashlib.blake2b(parent, digest_size=KEY_BYTES, person=b"kvmesh-block")
        h.update(data[i * step : (i + 1) * step])
        parent = h.digest()
        keys.append(parent)
    return keys
