"""Decode steps over KV slots held in place (GroupQueryAttention graphs), one sequence or a batch.

Each layer's keys and values live in one buffer (slots, kv_heads, capacity, head_dim); sequence i
holds slot i, its tokens left-aligned. A step runs the first `active` slots together: input_ids
(B, 1), an attention mask (B, T) with ones over each row's own tokens (GQA takes each row's
length and position from it), and past/present bound to the same buffers, so each row's new
key/value is written in place at its own position. Sequences stay packed in slots 0..B-1:
when one leaves, the last one moves into its slot.

The buffers are numpy arrays for a CPU session (`HostSlots`) and live in the device's memory for
a CUDA session (`DeviceSlots`): a step then moves only token ids, the mask and the logits.
"""

from __future__ import annotations

import ctypes
import mmap
import threading
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from kvmesh.errors import InvalidArgument, ResourceExhausted
from kvmesh.model.kv import KVCache, KVLayout
from kvmesh.model.lease import Place, SlotLease
from kvmesh.model.runner import ModelRunner, kv_io_names


def _arrays(kv: KVCache) -> list[np.ndarray]:
    return [a for pair in zip(kv.keys, kv.values, strict=True) for a in pair]


def _cache(arrays: list[np.ndarray]) -> KVCache:
    return KVCache(arrays[0::2], arrays[1::2])


class HostSlots:
    """Slots in host memory: one numpy array per layer and part, (slots, kv_heads, capacity, head_dim),
    in anonymous memory reserved for the whole capacity (the model's context) but resident only
    where tokens have been held.

    First-touch page faults cost ~0.1-1.5 GB/s on this kind of machine (a 512-token join into
    fresh memory took 150-380 ms and stalled every running stream), so each slot's first
    `warm_tokens` are faulted in at start, and a join or a move into a slot faults in the range it
    needs at once (MADV_POPULATE_WRITE, ~1.4 GB/s, faster than faulting page by page while
    copying). Pages stay once faulted, so a slot that held a long sequence takes the next one
    without faults, until the slots together hold more than `budget_tokens`: then a slot left
    free gives back what it held beyond its warm part."""

    def __init__(self, layout: KVLayout, slots: int, capacity: int, warm_tokens: int, budget_tokens: int) -> None:
        # One reservation, buffer j = all[j]: a slot is then one strided view across every buffer
        # (`place`), in the prefix store's block order, that a prefill reads stored blocks into.
        self._all = reserved((2 * layout.layers, slots, layout.kv_heads, capacity, layout.head_dim), layout.dtype)
        self.buffers = list(self._all)
        self._heads, self._capacity = layout.kv_heads, capacity
        self._row = layout.head_dim * layout.dtype.itemsize  # bytes of one token of one head
        self.warm = min(warm_tokens, capacity)
        self.budget = budget_tokens
        self.faulted = np.zeros(slots, np.int64)  # per slot: its first `faulted` tokens are resident
        for slot in range(slots):
            self.ensure(slot, self.warm)

    def _advise(self, slot: int, start: int, end: int, advice: int) -> None:
        """madvise the tokens [start, end) of `slot` in every buffer and head: POPULATE rounds out
        to whole pages, DONTNEED in (never a page holding a token below `start`)."""
        page = mmap.PAGESIZE
        for buf in self.buffers:
            for head in range(self._heads):
                region = buf.ctypes.data + (slot * self._heads + head) * self._capacity * self._row
                a, b = region + start * self._row, region + end * self._row
                a, b = (
                    (a // page * page, -(-b // page) * page)
                    if advice == _MADV_POPULATE_WRITE
                    else (-(-a // page) * page, b // page * page)
                )
                if b > a:
                    _libc.madvise(ctypes.c_void_p(a), ctypes.c_size_t(b - a), advice)

    def ensure(self, slot: int, tokens: int) -> None:
        """Fault in slot's first `tokens` (a no-op where they are)."""
        have = int(self.faulted[slot])
        if tokens > have:
            self._advise(slot, have, tokens, _MADV_POPULATE_WRITE)
            self.faulted[slot] = tokens

    def vacated(self, slot: int) -> None:
        """`slot` holds nothing now: over the budget, it gives back what it held beyond its warm part."""
        if self.faulted.sum() > self.budget and self.faulted[slot] > self.warm:
            self._advise(slot, self.warm, int(self.faulted[slot]), _MADV_DONTNEED)
            self.faulted[slot] = self.warm

    @property
    def resident_tokens(self) -> int:
        return int(self.faulted.sum())

    def write(self, slot: int, kv: KVCache) -> None:
        self.ensure(slot, kv.length + 1)
        for buf, src in zip(self.buffers, _arrays(kv), strict=True):
            buf[slot, :, : kv.length] = src[0]  # converts, if the KV came in another float type

    def grew(self, lengths: np.ndarray) -> None:
        """A step wrote each active slot's next token (its page faulted in by the write itself:
        one small fault per 16 tokens and head); the marks follow. lengths: (B,)."""
        b = len(lengths)
        np.maximum(self.faulted[:b], lengths, out=self.faulted[:b])

    def move(self, src: int, dst: int, tokens: int) -> None:
        self.ensure(dst, tokens + 1)
        for buf in self.buffers:
            buf[dst, :, :tokens] = buf[src, :, :tokens]

    def read(self, slot: int, tokens: int) -> KVCache:
        return _cache([buf[slot : slot + 1, :, :tokens] for buf in self.buffers])

    def place(self, slot: int) -> Place:
        """The slot as a prefill writes into it (kvmesh/model/lease.py)."""
        blocks = self._all[:, slot].reshape(len(self._all) // 2, 2, *self._all.shape[2:])  # a view: axis 0 split
        return Place(slot, blocks, [buf[slot : slot + 1] for buf in self.buffers], lambda n: self.ensure(slot, n))

    def bind(self, io: ort.IOBinding, b: int) -> None:
        """Past and present of the first b slots (a leading-dimension slice: still contiguous)."""
        for (past, present), buf in zip(kv_io_names(len(self.buffers) // 2), self.buffers, strict=True):
            value = ort.OrtValue.ortvalue_from_numpy(buf[:b])
            io.bind_ortvalue_input(past, value)
            io.bind_ortvalue_output(present, value)


_MADV_POPULATE_WRITE = 23  # Linux >= 5.14: fault pages in writable, contents untouched
_MADV_DONTNEED = 4  # give the pages back: zeros when touched again
_libc = ctypes.CDLL(None, use_errno=True)  # ctypes calls release the GIL (mmap.madvise does not)


def reserved(shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
    """Zeros in anonymous memory, page-aligned, none of it resident until touched or populated."""
    count = int(np.prod(shape))
    # Private: MADV_DONTNEED then frees the pages (a shared anonymous map, mmap's default, keeps
    # them in its shmem object and only unmaps them). The array keeps the map alive.
    size = max(1, count * np.dtype(dtype).itemsize)
    region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return np.frombuffer(region, dtype, count=count).reshape(shape)


def prefaulted(shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
    """Zeros in anonymous memory whose pages are already faulted in (resident from now on)."""
    array = reserved(shape, dtype)
    address = ctypes.c_void_p(array.ctypes.data)
    if _libc.madvise(address, ctypes.c_size_t(max(1, array.nbytes)), _MADV_POPULATE_WRITE) != 0:
        array.fill(0)  # an older kernel: touch every page by writing it
    return array


def copy_graph(count: int, dtype: np.dtype[Any]) -> onnx.ModelProto:
    """x0..x{count-1} -> y0..: Identity each. Run with its inputs and outputs bound to addresses, it
    is a copy into, out of or within device memory (ORT's Python API has no memcpy to an address)."""
    t = helper.np_dtype_to_tensor_dtype(dtype)
    nodes = [helper.make_node("Identity", [f"x{j}"], [f"y{j}"]) for j in range(count)]
    ins = [helper.make_tensor_value_info(f"x{j}", t, None) for j in range(count)]
    outs = [helper.make_tensor_value_info(f"y{j}", t, None) for j in range(count)]
    graph = helper.make_graph(nodes, "kvmesh_copy", ins, outs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


class DeviceSlots:
    """Slots in an execution provider's memory (CUDA; CPU in tests): one allocation per layer and
    part, (slots, kv_heads, capacity, head_dim), bound to the model by address. A slot is one
    contiguous (kv_heads, capacity, head_dim) block, so copies in, out and between slots are whole
    blocks, staged through host arrays of that shape."""

    def __init__(self, runner: ModelRunner, slots: int, capacity: int, device: str) -> None:
        lay = runner.layout
        self.device, self.dtype = device, lay.dtype
        self.slot_shape = [1, lay.kv_heads, capacity, lay.head_dim]
        self.slot_bytes = lay.kv_heads * capacity * lay.head_dim * lay.dtype.itemsize
        shape = [slots, *self.slot_shape[1:]]
        self.buffers = [
            ort.OrtValue.ortvalue_from_shape_and_type(shape, lay.dtype, device, 0) for _ in range(2 * lay.layers)
        ]
        self._stage = [np.zeros(self.slot_shape, lay.dtype) for _ in self.buffers]
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep the Identity nodes
        graph = copy_graph(len(self.buffers), lay.dtype).SerializeToString()
        self._copy = ort.InferenceSession(graph, opts, providers=runner.session.get_providers())

    def _address(self, j: int, slot: int) -> int:
        return int(self.buffers[j].data_ptr()) + slot * self.slot_bytes

    def _bind_slot(self, io: ort.IOBinding, name: str, j: int, slot: int, output: bool) -> None:
        bind = io.bind_output if output else io.bind_input
        bind(name, self.device, 0, self.dtype, self.slot_shape, self._address(j, slot))

    def write(self, slot: int, kv: KVCache) -> None:
        io = self._copy.io_binding()
        for j, src in enumerate(_arrays(kv)):
            self._stage[j][0, :, : kv.length] = src[0]  # the rest of the slot is masked out
            io.bind_cpu_input(f"x{j}", self._stage[j])
            self._bind_slot(io, f"y{j}", j, slot, output=True)
        self._copy.run_with_iobinding(io)

    def move(self, src: int, dst: int, tokens: int) -> None:
        io = self._copy.io_binding()
        for j in range(len(self.buffers)):
            self._bind_slot(io, f"x{j}", j, src, output=False)
            self._bind_slot(io, f"y{j}", j, dst, output=True)
        self._copy.run_with_iobinding(io)

    def read(self, slot: int, tokens: int) -> KVCache:
        io = self._copy.io_binding()
        for j, stage in enumerate(self._stage):
            self._bind_slot(io, f"x{j}", j, slot, output=False)
            io.bind_output(f"y{j}", "cpu", 0, self.dtype, self.slot_shape, stage.ctypes.data)
        self._copy.run_with_iobinding(io)
        return _cache([stage[:, :, :tokens].copy() for stage in self._stage])

    # Device memory is allocated whole when the slots are made: nothing to fault in or give back.
    def grew(self, lengths: np.ndarray) -> None:
        pass

    def vacated(self, slot: int) -> None:
        pass

    def bind(self, io: ort.IOBinding, b: int) -> None:
        shape = [b, *self.slot_shape[1:]]
        for j, (past, present) in enumerate(kv_io_names(len(self.buffers) // 2)):
            address = self._address(j, 0)
            io.bind_input(past, self.device, 0, self.dtype, shape, address)
            io.bind_output(present, self.device, 0, self.dtype, shape, address)


class SlotBatch:
    def __init__(
        self,
        runner: ModelRunner,
        slots: int,
        capacity: int,
        on_device: bool | None = None,
        warm_tokens: int | None = None,
        budget_tokens: int | None = None,
    ) -> None:
        """on_device: slots in the session's device memory through `DeviceSlots` (default: when the
        session runs on CUDA; True on CPU runs that path on host memory, for tests). Host slots:
        warm_tokens of each resident from the start (default all), pages beyond given back by free
        slots while they hold more than budget_tokens together (default: never), see HostSlots."""
        if not runner.shares_buffers:
            raise InvalidArgument("batched decode needs a GroupQueryAttention graph")
        self.runner, self.slots, self.capacity = runner, slots, capacity
        device = runner.device
        if on_device is None:
            on_device = device != "cpu"
        if not on_device and device != "cpu":
            raise InvalidArgument(f"a {device} session keeps its decode slots in device memory")
        self._rebind_inputs = device != "cpu"  # host inputs are copied to the device when bound
        self.kv = (
            DeviceSlots(runner, slots, capacity, device)
            if on_device
            else HostSlots(
                runner.layout,
                slots,
                capacity,
                capacity if warm_tokens is None else warm_tokens,
                slots * capacity if budget_tokens is None else budget_tokens,
            )
        )
        self.lengths = np.zeros(slots, np.int64)  # tokens held per slot
        # read() is a view of host memory (cheap for a block), or a copy of the whole slot out of
        # the device (~377 MB at SmolLM2's context): then blocks are not read one at a time
        self.reads_in_place = isinstance(self.kv, HostSlots)
        # Inputs bound once per batch size and updated in place: ids (slots, 1); the mask spans the
        # whole capacity, ones over each slot's tokens (GQA takes each row's length from its sum).
        self._ids = np.zeros((slots, 1), np.int64)
        self._mask = np.zeros((slots, capacity), np.int64)
        self.active = 0
        # Slots lent to prefills of this process (SlotLease), all at or above `active`; the lock
        # is held where `active` or the lent slots change (a prefill thread lends).
        self._lent: set[int] = set()
        self._lock = threading.Lock()
        self._logits = np.zeros((slots, 1, runner.vocab_size), np.float32)
        self._bound = -1  # the batch size the binding was made for
        self._io = runner.decode_session.io_binding()

    @property
    def can_add(self) -> bool:
        """Whether add() has a slot: the next one is neither busy nor lent."""
        return self.active < self.slots and self.active not in self._lent

    def add(self, kv: KVCache) -> int:
        """Copy one sequence's KV into the next free slot. -> the slot."""
        if not self.can_add:
            raise ResourceExhausted(f"all {self.slots} decode slots are busy")
        if kv.length >= self.capacity:
            raise ResourceExhausted(f"{kv.length} tokens exceed a slot's capacity of {self.capacity}")
        with self._lock:
            slot = self.active
            self.kv.write(slot, kv)
            self._joined(kv.length)
        return slot

    def _joined(self, tokens: int) -> None:
        slot = self.active
        self.lengths[slot] = tokens
        self._mask[slot] = 0
        self._mask[slot, :tokens] = 1
        self.active += 1

    def lease(self) -> SlotLease | None:
        """A slot for a prefill of this process to write into (host slots only), lent when its run starts."""
        return SlotLease(self._lend, self.give_back) if isinstance(self.kv, HostSlots) else None

    def _lend(self) -> Place | None:
        assert isinstance(self.kv, HostSlots)
        with self._lock:
            # the lowest free slot: prefills run one at a time, so lent slots join in order and
            # mostly where they lie (at `active`)
            slot = next((i for i in range(self.active, self.slots) if i not in self._lent), None)
            if slot is None:
                return None
            self._lent.add(slot)
        return self.kv.place(slot)

    def give_back(self, slot: int) -> None:
        """A lent slot, unused: free again."""
        with self._lock:
            self._lent.discard(slot)
            self.kv.vacated(slot)

    def join(self, slot: int, tokens: int) -> int | None:
        """The lent `slot`, holding a sequence's `tokens`, joins the batch: where it lies if that is
        the next slot, else moved there (a copy; a sequence left meanwhile). None: the next slot is
        lent to a prefill still writing; join again later. -> the slot it runs in."""
        with self._lock:
            if slot != self.active:
                if self.active in self._lent:
                    return None
                self.kv.move(slot, self.active, tokens)
                self.kv.vacated(slot)
            self._lent.discard(slot)
            self._joined(tokens)
            return self.active - 1

    def remove(self, slot: int) -> int | None:
        """Free a slot; the last sequence moves into it. -> the slot that moved there, if any."""
        with self._lock:
            last = self.active - 1
            moved = None
            if slot != last:
                n = int(self.lengths[last])
                self.kv.move(last, slot, n)
                self.lengths[slot] = n
                self._mask[slot] = self._mask[last]
                moved = last
            self.lengths[last] = 0
            self._mask[last] = 0
            self.active -= 1
            self.kv.vacated(last)
        return moved

    def read(self, slot: int, tokens: int | None = None) -> KVCache:
        """The KV a slot holds (its first `tokens`), (1, kv_heads, tokens, head_dim) per layer and part."""
        return self.kv.read(slot, int(self.lengths[slot]) if tokens is None else tokens)

    def step(self, tokens: np.ndarray) -> np.ndarray:
        """tokens (B,) for slots 0..B-1 -> logits (B, vocab); each slot grows by one token.
        The returned logits are rewritten by the next step."""
        b = self.active
        if tokens.shape != (b,):
            raise InvalidArgument(f"{tokens.shape[0]} tokens for {b} active slots")
        if int(self.lengths[:b].max()) + 1 > self.capacity:
            raise ResourceExhausted("a sequence reached its slot's capacity")
        if self._bound != b:
            self._bind(b)
        self._mask[np.arange(b), self.lengths[:b]] = 1  # each row's new position
        self.lengths[:b] += 1
        self.kv.grew(self.lengths[:b])
        self._ids[:b, 0] = tokens
        if self._rebind_inputs:
            # A host input of a CUDA session is copied to the device when it is bound, not when the
            # session runs: bound once, every step would see the first step's ids and mask.
            self._io.bind_cpu_input("input_ids", self._ids[:b])
            self._io.bind_cpu_input("attention_mask", self._mask[:b])
        self.runner.decode_session.run_with_iobinding(self._io)
        return self._logits[:b, 0]

    def _bind(self, b: int) -> None:
        self.kv.bind(self._io, b)
        logits = self._logits[:b]
        self._io.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        self._io.bind_ortvalue_input("input_ids", ort.OrtValue.ortvalue_from_numpy(self._ids[:b]))
        self._io.bind_ortvalue_input("attention_mask", ort.OrtValue.ortvalue_from_numpy(self._mask[:b]))
        self._bound = b


class Decoder:
    """Decode steps for one sequence: step(token) -> logits (vocab,) of the next position."""

    def __init__(self, runner: ModelRunner, capacity: int) -> None:
        self.runner = runner
        self.capacity = capacity
        self.length = 0

    def _grow(self) -> None:
        if self.length >= self.capacity:
            raise ResourceExhausted(f"sequence reached its capacity of {self.capacity} tokens")
        self.length += 1

    def step(self, token: int) -> np.ndarray:
        raise NotImplementedError

    def kv(self) -> KVCache:
        raise NotImplementedError


class ConcatDecoder(Decoder):
    """Any decoder graph: present comes back as a new array and is fed as the next past."""

    def __init__(self, runner: ModelRunner, kv: KVCache, capacity: int) -> None:
        super().__init__(runner, capacity)
        self._kv, self.length = kv.astype(runner.layout.dtype), kv.length

    def step(self, token: int) -> np.ndarray:
        self._grow()
        logits, self._kv = self.runner.forward(np.array([[token]], np.int64), self._kv)
        last: np.ndarray = logits[0, -1]
        return last

    def kv(self) -> KVCache:
        return self._kv


class SharedBufferDecoder(Decoder):
    """One sequence on a one-slot `SlotBatch`: each step writes one position in place instead of
    copying the whole context (at 2,000 tokens on CPU: ~12 ms a step instead of ~18)."""

    def __init__(self, runner: ModelRunner, kv: KVCache, capacity: int) -> None:
        super().__init__(runner, capacity)
        self.length = kv.length
        self._batch = SlotBatch(runner, 1, capacity)
        self._batch.add(kv)
        self._token = np.zeros(1, np.int64)

    def step(self, token: int) -> np.ndarray:
        self._grow()
        self._token[0] = token
        last: np.ndarray = self._batch.step(self._token)[0].copy()  # the buffer is rewritten by the next step
        return last

    def kv(self) -> KVCache:
        return self._batch.read(0)


class SequentialBatch:
    """The same interface for graphs without GroupQueryAttention (an Optimum export): each slot
    has its own decoder and a step runs them one after another. Correct, not batched."""

    def __init__(self, runner: ModelRunner, slots: int, capacity: int) -> None:
        self.runner, self.slots, self.capacity = runner, slots, capacity
        self._decoders: list[Decoder] = []
        self.reads_in_place = True

    @property
    def active(self) -> int:
        return len(self._decoders)

    @property
    def lengths(self) -> np.ndarray:
        return np.array([d.length for d in self._decoders], np.int64)

    @property
    def can_add(self) -> bool:
        return self.active < self.slots

    def lease(self) -> SlotLease | None:
        return None  # no slot buffers: each sequence has its own decoder

    def add(self, kv: KVCache) -> int:
        if self.active == self.slots:
            raise ResourceExhausted(f"all {self.slots} decode slots are busy")
        self._decoders.append(ConcatDecoder(self.runner, kv, self.capacity))
        return self.active - 1

    def remove(self, slot: int) -> int | None:
        last = self.active - 1
        self._decoders[slot] = self._decoders[last]
        self._decoders.pop()
        return last if slot != last else None

    def step(self, tokens: np.ndarray) -> np.ndarray:
        return np.stack([d.step(int(t)) for d, t in zip(self._decoders, tokens, strict=True)])

    def read(self, slot: int, tokens: int | None = None) -> KVCache:
        kv = self._decoders[slot].kv()
        return kv if tokens is None else kv.prefix(tokens)


def make_batch(
    runner: ModelRunner, slots: int, capacity: int, warm_tokens: int | None = None, budget_tokens: int | None = None
) -> SlotBatch | SequentialBatch:
    if runner.shares_buffers:
        return SlotBatch(runner, slots, capacity, warm_tokens=warm_tokens, budget_tokens=budget_tokens)
    return SequentialBatch(runner, slots, capacity)


def decode_loop(runner: ModelRunner, kv: KVCache, capacity: int) -> Decoder:
    """A decode loop over `kv` (one sequence) that may grow to `capacity` tokens in all: in place
    on a one-slot batch where the graph allows it, else present fed back as past."""
    if capacity > runner.max_context:
        raise InvalidArgument(f"{capacity} tokens exceed the model's context of {runner.max_context}")
    if runner.shares_buffers:
        return SharedBufferDecoder(runner, kv, capacity)
    return ConcatDecoder(runner, kv, capacity)
