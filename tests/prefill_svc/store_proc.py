"""A process that holds a prefix store, for the multi-process tests:
python -m tests.prefill_svc.store_proc write PATH          write random chains until killed
python -m tests.prefill_svc.store_proc read PATH KEYS_HEX  read a chain, print blocks and a digest
"""

import hashlib
import json
import sys
from pathlib import Path

import numpy as np

from kvmesh.model.kv import KVLayout
from prefill_svc.store import PrefixStore, StoreConfig

LAYOUT = KVLayout(layers=2, kv_heads=2, head_dim=16, dtype=np.dtype(np.float32))
FINGERPRINT = "store-proc-test"
BLOCK = 8


def open_store(path: Path, budget: int = 1 << 30) -> PrefixStore:
    return PrefixStore(StoreConfig(path, budget_bytes=budget, block_size=BLOCK), FINGERPRINT, LAYOUT)


def write(path: Path) -> None:
    store = open_store(path, budget=40 * 2 * 2 * 2 * BLOCK * 16 * 4)  # small: eviction runs too
    rng = np.random.default_rng()
    shape = (LAYOUT.layers, 2, LAYOUT.kv_heads, BLOCK, LAYOUT.head_dim)
    for n in range(1_000_000):
        keys = [rng.bytes(16) for _ in range(4)]
        store.put(keys, lambda _: rng.standard_normal(shape, dtype=np.float32), lambda *_: None)
        print(f"wrote {n}", flush=True)


def read(path: Path, keys_hex: str) -> None:
    store = open_store(path)
    keys = [bytes.fromhex(k) for k in keys_hex.split(",")]
    out = np.zeros((LAYOUT.layers, 2, LAYOUT.kv_heads, BLOCK * len(keys), LAYOUT.head_dim), np.float32)
    n, bad = store.read(keys, out)
    print(json.dumps({"blocks": n, "bad": len(bad), "digest": hashlib.sha256(out.tobytes()).hexdigest()}))


if __name__ == "__main__":
    {"write": lambda: write(Path(sys.argv[2])), "read": lambda: read(Path(sys.argv[2]), sys.argv[3])}[sys.argv[1]]()
