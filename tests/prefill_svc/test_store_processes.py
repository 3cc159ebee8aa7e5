"""The store across processes: a writer killed with SIGKILL mid-write leaves a store whose every
block passes its checksum; several processes read one store at once."""

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from prefill_svc.store import Meta
from tests.prefill_svc.store_proc import BLOCK, LAYOUT, open_store

ROOT = Path(__file__).parents[2]


def _spawn(*args: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "tests.prefill_svc.store_proc", *args]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _check_every_block(path: Path) -> int:
    store = open_store(path)
    try:
        with store.env.begin() as txn:
            total = 0
            for key, raw in txn.cursor(db=store.meta):
                meta = Meta.unpack(raw)
                out = np.empty((LAYOUT.layers, 2, LAYOUT.kv_heads, BLOCK, LAYOUT.head_dim), np.float32)
                assert store.read([bytes(key)], out) == (1, [])  # present and passes its checksum
                parent_ok = meta.parent == bytes(16) or txn.get(meta.parent, db=store.meta) is not None
                assert parent_ok, "orphan block"
                total += meta.size
            assert total == store.stats()[0]
            return int(txn.stat(store.meta)["entries"])
    finally:
        store.close()


def test_sigkill_while_writing_leaves_only_good_blocks(tmp_path: Path) -> None:
    path = tmp_path / "store"
    for delay in (0.3, 0.55, 0.8):
        proc = _spawn("write", str(path))
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith("wrote"), proc.stderr.read() if proc.stderr else ""
        time.sleep(delay)  # it commits many times a second: the kill lands mid-write
        proc.kill()
        proc.wait(timeout=10)
        assert proc.returncode == -9
        assert _check_every_block(path) > 0


def test_two_processes_read_one_store(tmp_path: Path) -> None:
    path = tmp_path / "store"
    store = open_store(path)  # held open by this process while the others read
    rng = np.random.default_rng(0)
    keys = [rng.bytes(16) for _ in range(5)]
    shape = (LAYOUT.layers, 2, LAYOUT.kv_heads, BLOCK, LAYOUT.head_dim)
    values = [rng.standard_normal(shape, dtype=np.float32) for _ in keys]
    store.put(keys, lambda i: values[i], lambda *_: None)
    expected = hashlib.sha256(np.concatenate(values, axis=3).tobytes()).hexdigest()
    readers = [_spawn("read", str(path), ",".join(k.hex() for k in keys)) for _ in range(2)]
    for proc in readers:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert json.loads(out) == {"blocks": 5, "bad": 0, "digest": expected}
    store.close()
