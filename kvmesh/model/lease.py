"""A decode slot lent to a prefill in the same process (a colocated worker).

The prefill reads the stored prefix straight into the slot and runs the model there, in place
(`ModelRunner.prefill_in_place`); the slot then joins the decode batch where it lies. Before, a
warm join copied its KV three times: store -> a past buffer, past -> present inside the model
(into memory ORT had just allocated), present -> the slot on the decode thread between two steps,
which stalled every running stream (~70 MB of copies for a 512-token prompt).

Who holds a lease: the request's coroutine from `SlotBatch.lease()` until the batcher has it
(`hand_over`); the prefill thread writes into the slot between `take` and `written`. A slot goes
back to the batch exactly once: when the request leaves before the batcher has it (`abandon`;
if the prefill is still writing, when it ends), when the prefill fails, or by the batcher.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from kvmesh.model.kv import KVCache


@dataclass(frozen=True)
class Place:
    """Where a prefill writes: one slot of a batch's host buffers."""

    slot: int
    # (layers, 2, kv_heads, capacity, head_dim): a view of the slot, in the prefix store's block order
    blocks: np.ndarray
    # per buffer, in kv_io_names order: (1, kv_heads, capacity, head_dim), contiguous (bound to the model)
    buffers: list[np.ndarray]
    ensure: Callable[[int], None]  # fault in the slot's first n tokens

    def kv(self, tokens: int) -> KVCache:
        """The slot's first `tokens`, per layer (1, kv_heads, tokens, head_dim): views."""
        return KVCache([b[:, :, :tokens] for b in self.buffers[0::2]], [b[:, :, :tokens] for b in self.buffers[1::2]])


class SlotLease:
    def __init__(self, lend: Callable[[], Place | None], give_back: Callable[[int], None]) -> None:
        """lend: a free slot of the batch, or None; give_back(slot): it is free again."""
        self._lend, self._give_back = lend, give_back
        self._lock = threading.Lock()
        self.place: Place | None = None
        self._writing = self._left = self._handed = False

    def take(self) -> Place | None:
        """The prefill thread, as its run starts: a slot to write into (None: none is free, or the
        request has left; the prefill then runs out of place)."""
        with self._lock:
            if self._left or self.place is not None:
                return None
            self.place = self._lend()
            self._writing = self.place is not None
            return self.place

    def written(self, ok: bool) -> None:
        """The prefill thread, as its run ends; not ok: it failed, and the slot goes back."""
        with self._lock:
            self._writing = False
            if self.place is not None and (self._left or not ok):
                self._release()

    def abandon(self) -> None:
        """The request left before the batcher had the slot: back now, or once the prefill ends."""
        with self._lock:
            if self._handed:
                return
            self._left = True
            if self.place is not None and not self._writing:
                self._release()

    def hand_over(self) -> Place | None:
        """The batcher takes the slot (it gives it back itself from now on)."""
        with self._lock:
            self._handed = True
            return None if self._left else self.place

    def _release(self) -> None:
        assert self.place is not None
        slot, self.place = self.place.slot, None
        self._give_back(slot)


@dataclass
class LeasedKV(KVCache):
    """A prompt's KV already in a decode slot: views of it, and the lease that holds it."""

    lease: SlotLease
