"""The persistent prefix store: the KV of full prompt blocks in LMDB, keyed by the block-key chain.

Sub-databases of one LMDB environment:
  info      fingerprint, layout, block size, total value bytes
  blocks    key (16 B) -> the block's KV, fp32 C-order (layers, 2, kv_heads, block_size, head_dim)
  meta      key -> parent key, value bytes, last access (ns), xxh3 checksum, flags (pinned, decoded)
  lru       last access (8 B big-endian) + key -> b"": the eviction order
  children  parent key -> child keys (dupsort): a block is evicted only when it has none

Readers (the prefill path) use LMDB's lock-free MVCC read transactions from any thread or process.
All writes go through one writer thread per process (StoreWriter), off the request's path; LMDB
serializes writers of several processes sharing a store. Commits are not fsynced: a crashed
process loses nothing committed, a lost machine may lose the last commits of a cache, and every
value is verified against its checksum on read anyway.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import queue
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import lmdb
import numpy as np
import xxhash

from kvmesh.errors import InvalidArgument, ModelError
from kvmesh.model.kv import KVLayout

log = logging.getLogger(__name__)
_META = struct.Struct("<16sQQQB")  # parent, size, last access ns, checksum, flags
_PINNED = 1
# The value is a decode node's KV made with other numerics than this node's prefill (int8
# activations): a migrated sequence resumes from it, a prompt's lookup stops before it until the
# block is recomputed exactly (stored KV of prompts stays what an exact prefill makes).
_DECODED = 2
_NO_PARENT = bytes(16)  # the parent of a chain's first block: the root, which is not stored
EventSink = Callable[[str, list[bytes]], None]  # ("stored" | "evicted" | "pinned", keys)


@dataclass(frozen=True)
class StoreConfig:
    path: Path
    budget_bytes: int = 2 << 30  # values kept below this; LRU leaves evicted beyond it
    block_size: int = 16

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.budget_bytes < 1:
            raise InvalidArgument("block_size and budget_bytes must be positive")

    @property
    def map_bytes(self) -> int:
        """LMDB's map: the budget plus room for metadata and B-tree pages freed but not yet reused."""
        return int(self.budget_bytes * 1.5) + (64 << 20)


@dataclass(frozen=True)
class Meta:
    parent: bytes
    size: int
    last_access: int
    checksum: int
    pinned: bool
    decoded: bool = False

    def pack(self) -> bytes:
        flags = (_PINNED if self.pinned else 0) | (_DECODED if self.decoded else 0)
        return _META.pack(self.parent, self.size, self.last_access, self.checksum, flags)

    @staticmethod
    def unpack(raw: bytes | memoryview | None) -> Meta:
        if raw is None:
            raise KeyError("no metadata for a listed block")
        parent, size, last, checksum, flags = _META.unpack(bytes(raw))
        return Meta(parent, size, last, checksum, bool(flags & _PINNED), bool(flags & _DECODED))


def _lru_key(last_access: int, key: bytes) -> bytes:
    return struct.pack(">Q", last_access) + key


class PrefixStore:
    def __init__(self, config: StoreConfig, fingerprint: str, layout: KVLayout) -> None:
        self.config = config
        self.layout = layout
        self.block_shape = (layout.layers, 2, layout.kv_heads, config.block_size, layout.head_dim)
        # blocks hold the model's own KV type: float32, or float16 (a CUDA graph)
        self.block_bytes = int(np.prod(self.block_shape)) * layout.dtype.itemsize
        config.path.mkdir(parents=True, exist_ok=True)
        # writemap: a put writes straight into the shared map instead of into malloc'd pages that
        # the commit then pwrite()s: 96 MB of blocks commit in ~115 ms instead of ~250. The data
        # file is then as long as the map (sparse: only written pages take disk). Committed
        # transactions stay intact if the process dies; checksums catch anything else.
        self.env = lmdb.open(
            str(config.path),
            map_size=config.map_bytes,
            max_dbs=5,
            sync=False,
            metasync=False,
            readahead=False,
            writemap=True,
            max_readers=256,
        )
        self.info, self.blocks, self.meta = (self.env.open_db(n) for n in (b"info", b"blocks", b"meta"))
        self.lru, self.children = self.env.open_db(b"lru"), self.env.open_db(b"children", dupsort=True)
        self._claim(fingerprint)

    def _claim(self, fingerprint: str) -> None:
        """Record what the store is for, or refuse a store made for another model or layout."""
        mine = json.dumps(
            {
                "fingerprint": fingerprint,
                "block_size": self.config.block_size,
                "block_shape": self.block_shape,
                "dtype": self.layout.dtype.name,
            },
            sort_keys=True,
        ).encode()
        with self.env.begin(write=True) as txn:
            theirs = txn.get(b"identity", db=self.info)
            if theirs is None:
                txn.put(b"identity", mine, db=self.info)
                txn.put(b"total_bytes", struct.pack("<Q", 0), db=self.info)
            elif bytes(theirs) != mine:
                raise ModelError(
                    f"prefix store {self.config.path} was made for another model or layout "
                    f"({json.loads(theirs)['fingerprint']}); refusing its blocks"
                )

    def close(self) -> None:
        self.env.close()

    # ---- readers: any thread ----

    def cached_blocks(self, keys: Sequence[bytes], decoded: bool = False) -> int:
        """How many leading keys the store holds (no value is read); decoded: counting blocks a
        decode node made with other numerics (a resumption's lookup), else stopping before them."""
        with self.env.begin(buffers=True) as txn:
            for i, key in enumerate(keys):
                raw = txn.get(key, db=self.meta)
                if raw is None or (not decoded and Meta.unpack(raw).decoded):
                    return i
        return len(keys)

    def read(self, keys: Sequence[bytes], out: np.ndarray) -> tuple[int, list[bytes]]:
        """Copy the leading blocks into out (layers, 2, kv_heads, >= n*block, head_dim), verifying
        each checksum. -> (blocks read, keys that failed their checksum: to drop and recompute)."""
        b = self.config.block_size
        with self.env.begin(buffers=True) as txn:
            for i, key in enumerate(keys):
                raw_meta, value = txn.get(key, db=self.meta), txn.get(key, db=self.blocks)
                if raw_meta is None or value is None:
                    return i, []
                if len(value) != self.block_bytes or xxhash.xxh3_64_intdigest(value) != Meta.unpack(raw_meta).checksum:
                    return i, [key]
                out[:, :, :, i * b : (i + 1) * b] = np.frombuffer(value, self.layout.dtype).reshape(self.block_shape)
        return len(keys), []

    def keys(self) -> Iterator[bytes]:
        with self.env.begin() as txn:
            yield from txn.cursor(db=self.meta).iternext(keys=True, values=False)

    def stats(self) -> tuple[int, int, int]:
        """(value bytes, blocks, pinned blocks)."""
        with self.env.begin() as txn:
            return self._total(txn), txn.stat(self.meta)["entries"], self._counter(txn, b"pinned_blocks")

    # ---- writes: the writer thread only ----

    def put(
        self,
        keys: Sequence[bytes],
        value_of: Callable[[int], np.ndarray],
        events: EventSink,
        parent: bytes | None = None,
        decoded: bool = False,
    ) -> bool:
        """Store a chain of blocks below `parent` (None: the chain's root); value_of(i) gives block
        i's KV, asked only for blocks not stored yet, or stored as `decoded` when these are exact
        (replaced). Blocks already there are touched; a chain whose parent is gone is not stored
        (never an orphan). -> whether the chain is all stored."""
        now = time.time_ns()
        with self.env.begin(write=True) as txn:
            if parent is not None and txn.get(parent, db=self.meta) is None:
                return False
            stored = {k: Meta.unpack(raw) for k in keys if (raw := txn.get(k, db=self.meta)) is not None}
            replaced = set() if decoded else {k for k, m in stored.items() if m.decoded}
            for key in replaced:  # the exact value takes the decoded one's place, links kept
                self._add_total(txn, -stored[key].size)
                txn.delete(_lru_key(stored[key].last_access, key), db=self.lru)
            new = {k for k in keys if k not in stored} | replaced
            need = self.block_bytes * (len(new) - len(replaced))
            self._evict(txn, need, exclude={*keys, *([parent] if parent else [])}, events=events)
            if self._total(txn) + need > self.config.budget_bytes:
                return False  # what is left is pinned or this chain's own ancestors
            self._touch(txn, [k for k in keys if k not in new], now)
            prev = parent
            for i, key in enumerate(keys):
                if key in new:
                    pinned = key in replaced and stored[key].pinned
                    self._insert(txn, prev, key, value_of(i), now, decoded, pinned)
                prev = key
        if added := [k for k in keys if k in new and k not in replaced]:
            events("stored", added)
        return True

    def _insert(
        self,
        txn: lmdb.Transaction,
        parent: bytes | None,
        key: bytes,
        value: np.ndarray,
        now: int,
        decoded: bool = False,
        pinned: bool = False,
    ) -> None:
        data = np.ascontiguousarray(value, dtype=self.layout.dtype).reshape(-1).view(np.uint8)
        if data.size != self.block_bytes:
            raise InvalidArgument(f"a block value must be {self.block_bytes} bytes, not {data.size}")
        meta = Meta(parent or _NO_PARENT, data.size, now, xxhash.xxh3_64_intdigest(data.data), pinned, decoded)
        txn.put(key, data.data, db=self.blocks)
        txn.put(key, meta.pack(), db=self.meta)
        txn.put(_lru_key(now, key), b"", db=self.lru)
        if parent is not None:
            txn.put(parent, key, db=self.children, dupdata=True)
        self._add_total(txn, meta.size)

    def _touch(self, txn: lmdb.Transaction, keys: Sequence[bytes], now: int) -> None:
        for key in keys:
            raw = txn.get(key, db=self.meta)
            if raw is None:
                continue
            meta = Meta.unpack(raw)
            txn.delete(_lru_key(meta.last_access, key), db=self.lru)
            txn.put(_lru_key(now, key), b"", db=self.lru)
            txn.put(key, dataclasses.replace(meta, last_access=now).pack(), db=self.meta)

    def pin(self, keys: Sequence[bytes], events: EventSink) -> int:
        """Mark stored blocks pinned (never evicted). -> how many leading keys are pinned."""
        with self.env.begin(write=True) as txn:
            for i, key in enumerate(keys):
                raw = txn.get(key, db=self.meta)
                if raw is None:
                    events("pinned", list(keys[:i]))
                    return i
                m = Meta.unpack(raw)
                if not m.pinned:
                    txn.put(key, dataclasses.replace(m, pinned=True).pack(), db=self.meta)
                    self._add(txn, b"pinned_blocks", 1)
        events("pinned", list(keys))
        return len(keys)

    def drop(self, key: bytes, events: EventSink) -> None:
        """Remove a block (a bad value) and every block below it."""
        with self.env.begin(write=True) as txn:
            gone = self._delete_subtree(txn, key)
        if gone:
            events("evicted", gone)

    def _delete_subtree(self, txn: lmdb.Transaction, key: bytes) -> list[bytes]:
        gone, stack = [], [key]
        while stack:
            k = stack.pop()
            cursor = txn.cursor(db=self.children)
            if cursor.set_key(k):
                stack.extend(bytes(c) for c in cursor.iternext_dup())
            if self._delete_one(txn, k):
                gone.append(k)
        return gone

    def _delete_one(self, txn: lmdb.Transaction, key: bytes) -> bool:
        raw = txn.get(key, db=self.meta)
        if raw is None:
            return False
        meta = Meta.unpack(raw)
        txn.delete(key, db=self.blocks)
        txn.delete(key, db=self.meta)
        txn.delete(_lru_key(meta.last_access, key), db=self.lru)
        txn.delete(meta.parent, key, db=self.children)
        txn.delete(key, db=self.children)
        self._add_total(txn, -meta.size)
        if meta.pinned:
            self._add(txn, b"pinned_blocks", -1)
        return True

    def _evict(self, txn: lmdb.Transaction, need: int, exclude: set[bytes], events: EventSink) -> None:
        """Delete least recently used unpinned leaves until `need` more bytes fit the budget. A
        parent is touched whenever its child is, so leaves come first in LRU order; a parent whose
        last child went becomes a leaf for the next pass."""
        evicted: list[bytes] = []
        while self._total(txn) + need > self.config.budget_bytes:
            shortfall = self._total(txn) + need - self.config.budget_bytes
            victims = []
            for lru_key in txn.cursor(db=self.lru).iternext(keys=True, values=False):
                key = bytes(lru_key)[8:]
                if key in exclude or txn.get(key, db=self.children) is not None:
                    continue
                if Meta.unpack(txn.get(key, db=self.meta)).pinned:
                    continue
                victims.append(key)
                if len(victims) * self.block_bytes >= shortfall:
                    break
            if not victims:
                break
            for key in victims:
                self._delete_one(txn, key)
            evicted += victims
        if evicted:
            events("evicted", evicted)

    def _total(self, txn: lmdb.Transaction) -> int:
        return self._counter(txn, b"total_bytes")

    def _add_total(self, txn: lmdb.Transaction, delta: int) -> None:
        self._add(txn, b"total_bytes", delta)

    def _counter(self, txn: lmdb.Transaction, name: bytes) -> int:
        raw = txn.get(name, db=self.info)
        return 0 if raw is None else int(struct.unpack("<Q", raw)[0])

    def _add(self, txn: lmdb.Transaction, name: bytes, delta: int) -> None:
        txn.put(name, struct.pack("<Q", self._counter(txn, name) + delta), db=self.info)


class StoreWriter:
    """The one thread of this process that writes the store: jobs run in submission order.

    `quiet` tells when the node is neither running the model nor streaming KV: a job waits for
    it, so a write does not take a core from a request in flight, but never past max_wait_s from
    its submission: under steady load jobs run late by at most that, and a backlog never grows.
    A prefill that needs blocks still waiting here (the same new prefix, twice in a row) reads them
    from the queued job's memory (PrefillEngine._pending) rather than waiting or computing them."""

    def __init__(
        self,
        store: PrefixStore,
        events: EventSink,
        quiet: Callable[[], bool] = lambda: True,
        max_wait_s: float = 0.5,
        on_fault: Callable[[BaseException], None] = lambda e: None,
    ) -> None:
        """on_fault: told of an unexpected error in a job (the thread goes on with the next)."""
        self.store, self.events, self._on_fault = store, events, on_fault
        self._quiet, self._max_wait_s = quiet, max_wait_s
        # (job, its deadline to run even if the node is busy); None stops the thread
        self._jobs: queue.Queue[tuple[Callable[[PrefixStore, EventSink], None], float] | None] = queue.Queue()
        self._writing: Counter[bytes] = Counter()  # keys of the queued puts (model thread and writer)
        self._unfinished = 0  # jobs submitted and not finished
        self._deadline = 0.0  # the running job's
        self._lock = threading.Lock()
        self._urgent = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prefix-store-writer", daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[PrefixStore, EventSink], None], keys: Sequence[bytes] = ()) -> None:
        """Queue a job; `keys`: the blocks it writes (so a lookup can wait for them)."""
        if keys:
            with self._lock:
                self._writing.update(keys)

        def run(store: PrefixStore, events: EventSink) -> None:
            try:
                job(store, events)
            finally:
                with self._lock:
                    self._unfinished -= 1
                    for key in keys:
                        self._writing[key] -= 1
                        if not self._writing[key]:
                            del self._writing[key]

        with self._lock:
            self._unfinished += 1
        self._jobs.put((run, time.monotonic() + self._max_wait_s))

    @property
    def pending(self) -> int:
        """Jobs submitted and not finished, the one being written included (quiet: 0)."""
        return self._unfinished

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every job submitted so far has run (at most timeout_s). -> whether they have."""
        done = threading.Event()
        self.submit(lambda _s, _e: done.set())
        return done.wait(timeout_s)

    def close(self) -> None:
        """Run what is queued at once (busy or not), then stop."""
        self._urgent.set()
        self._jobs.put(None)
        self._thread.join()

    def pause(self) -> None:
        """Inside a job, between two of its transactions: let requests that came meanwhile run
        first, within the job's own deadline."""
        while not self._quiet() and time.monotonic() < self._deadline and not self._urgent.is_set():
            time.sleep(0.005)

    def _run(self) -> None:
        # At normal priority: at nice 19 (to leave the cores to model runs) the writer was
        # preempted while it held the GIL (waking the loop, polling `quiet`), and the loop and the
        # decode thread then waited for the GIL until it next got a core behind two spinning ORT
        # threads: 0.1-1.4 s gaps in every running stream of a colocated worker while it stored
        # blocks. At nice 0 those went, and one stream decoding after a new 2,200-token prompt
        # (written meanwhile) ran as fast (35-37 tokens/s either way on this machine that day).
        while (item := self._jobs.get()) is not None:
            job, self._deadline = item
            self.pause()
            try:
                job(self.store, self.events)
            except lmdb.Error:  # e.g. the map full: those blocks stay uncached
                log.exception("prefix store write failed; the blocks stay uncached")
            except Exception as e:  # a bug or a broken store: say so, and keep serving the queue
                log.exception("prefix store writer: unexpected error")
                self._on_fault(e)
