"""Batched decode steps over slots of shared KV buffers (GroupQueryAttention graphs on CPU).

Each layer's keys and values live in one array (slots, kv_heads, capacity, head_dim); sequence i
holds slot i, its tokens left-aligned. A step runs the first `active` slots together: input_ids
(B, 1), an attention mask (B, T) with ones over each row's own tokens (GQA takes each row's
length and position from it), and past/present bound to the same buffers, so each row's new
key/value is written in place at its own position. Sequences stay packed in slots 0..B-1:
when one leaves, the last one moves into its slot.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from kvmesh.errors import InvalidArgument, ResourceExhausted
from kvmesh.model.runner import Decoder, KVCache, ModelRunner


class SlotBatch:
    def __init__(self, runner: ModelRunner, slots: int, capacity: int) -> None:
        if not runner.shares_buffers:
            raise InvalidArgument("batched decode needs a GroupQueryAttention graph on CPU")
        lay = runner.layout
        self.runner, self.slots, self.capacity = runner, slots, capacity
        shape = (slots, lay.kv_heads, capacity, lay.head_dim)
        self.keys = [np.zeros(shape, lay.dtype) for _ in range(lay.layers)]
        self.values = [np.zeros(shape, lay.dtype) for _ in range(lay.layers)]
        self.lengths = np.zeros(slots, np.int64)  # tokens held per slot
        # Inputs bound once per batch size and updated in place: ids (slots, 1); the mask spans the
        # whole capacity, ones over each slot's tokens (GQA takes each row's length from its sum).
        self._ids = np.zeros((slots, 1), np.int64)
        self._mask = np.zeros((slots, capacity), np.int64)
        self.active = 0
        self._logits = np.zeros((slots, 1, runner.vocab_size), np.float32)
        self._bound = -1  # the batch size the binding was made for
        self._io = runner.decode_session.io_binding()

    def add(self, kv: KVCache) -> int:
        """Copy one sequence's KV into the next free slot. -> the slot."""
        if self.active == self.slots:
            raise ResourceExhausted(f"all {self.slots} decode slots are busy")
        if kv.length >= self.capacity:
            raise ResourceExhausted(f"{kv.length} tokens exceed a slot's capacity of {self.capacity}")
        slot = self.active
        for i in range(len(self.keys)):
            self.keys[i][slot, :, : kv.length] = kv.keys[i][0]
            self.values[i][slot, :, : kv.length] = kv.values[i][0]
        self.lengths[slot] = kv.length
        self._mask[slot] = 0
        self._mask[slot, : kv.length] = 1
        self.active += 1
        return slot

    def remove(self, slot: int) -> int | None:
        """Free a slot; the last sequence moves into it. -> the slot that moved there, if any."""
        last = self.active - 1
        moved = None
        if slot != last:
            n = int(self.lengths[last])
            for i in range(len(self.keys)):
                self.keys[i][slot, :, :n] = self.keys[i][last, :, :n]
                self.values[i][slot, :, :n] = self.values[i][last, :, :n]
            self.lengths[slot] = n
            self._mask[slot] = self._mask[last]
            moved = last
        self.lengths[last] = 0
        self._mask[last] = 0
        self.active -= 1
        return moved

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
        self._ids[:b, 0] = tokens
        self.runner.decode_session.run_with_iobinding(self._io)
        return self._logits[:b, 0]

    def _bind(self, b: int) -> None:
        """Bind the first b slots of every buffer (a leading-dimension slice: still contiguous)."""
        for i in range(len(self.keys)):
            for part, buf in (("key", self.keys[i]), ("value", self.values[i])):
                value = ort.OrtValue.ortvalue_from_numpy(buf[:b])
                self._io.bind_ortvalue_input(f"past_key_values.{i}.{part}", value)
                self._io.bind_ortvalue_output(f"present.{i}.{part}", value)
        logits = self._logits[:b]
        self._io.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        self._io.bind_ortvalue_input("input_ids", ort.OrtValue.ortvalue_from_numpy(self._ids[:b]))
        self._io.bind_ortvalue_input("attention_mask", ort.OrtValue.ortvalue_from_numpy(self._mask[:b]))
        self._bound = b


class SequentialBatch:
    """The same interface for graphs without GroupQueryAttention (an Optimum export): each slot
    has its own decoder and a step runs them one after another. Correct, not batched."""

    def __init__(self, runner: ModelRunner, slots: int, capacity: int) -> None:
        self.runner, self.slots, self.capacity = runner, slots, capacity
        self._decoders: list[Decoder] = []

    @property
    def active(self) -> int:
        return len(self._decoders)

    @property
    def lengths(self) -> np.ndarray:
        return np.array([d.length for d in self._decoders], np.int64)

    def add(self, kv: KVCache) -> int:
        if self.active == self.slots:
            raise ResourceExhausted(f"all {self.slots} decode slots are busy")
        self._decoders.append(self.runner.decoder(kv, self.capacity))
        return self.active - 1

    def remove(self, slot: int) -> int | None:
        last = self.active - 1
        self._decoders[slot] = self._decoders[last]
        self._decoders.pop()
        return last if slot != last else None

    def step(self, tokens: np.ndarray) -> np.ndarray:
        return np.stack([d.step(int(t)) for d, t in zip(self._decoders, tokens, strict=True)])


def make_batch(runner: ModelRunner, slots: int, capacity: int) -> SlotBatch | SequentialBatch:
    return (SlotBatch if runner.shares_buffers else SequentialBatch)(runner, slots, capacity)
