"""The decode loop: one thread that admits sequences into the batch, runs a step for all of them,
samples each, and lets finished or cancelled ones leave, every step (continuous batching)."""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from kvmesh.errors import KvmeshError
from kvmesh.model.batch import SlotBatch, make_batch
from kvmesh.model.kv import KVCache
from kvmesh.model.lease import LeasedKV, SlotLease
from kvmesh.model.runner import ModelRunner
from kvmesh.model.turns import Turns
from kvmesh.sampling import Sampler

log = logging.getLogger(__name__)

# What a sequence hears from the loop: (token, logprob) or ("end", reason)
Emit = Callable[[tuple[int, float] | tuple[str, str]], None]


# Where a sequence's kept KV goes: send(tokens, first_block, kv) with the blocks from first_block
# on (tokens: the sequence's from its first to the end of the last block sent); kv None: the end.
Send = Callable[[list[int], int, KVCache | None], None]


@dataclass(eq=False)
class KeepKV:
    """A sequence's KV kept for the prefix store: its full blocks of `block` tokens from block
    `first` on (the earlier ones are stored already) are sent as each fills (what a migration
    resumes from; on device slots only when it leaves), then the end (`send(tokens, first, None)`)."""

    first: int  # the next block to send
    block: int
    send: Send


@dataclass(eq=False)
class Sequence:
    request_id: str
    last_token: int  # the next step's input
    sampler: Sampler
    remaining: int  # tokens it may still make
    eos: tuple[int, ...]
    emit: Emit
    cancelled: bool = False
    slot: int = field(default=-1)
    group: bytes = b""  # its tenant's (the cache salt): free slots go to the group with the fewest running
    tokens: list[int] = field(default_factory=list)  # prompt, then those made (the last one not in the KV yet)
    keep: KeepKV | None = None
    # A migrated sequence's output that the KV it came with lacks, after last_token: each step
    # feeds the next of them instead of sampling (what the dead node did), then sampling goes on.
    replay: list[int] = field(default_factory=list)


class Batcher:
    def __init__(
        self,
        runner: ModelRunner,
        slots: int,
        capacity: int,
        on_step: Callable[[int, float], None],
        turns: Turns | None = None,
        warm_tokens: int | None = None,
        budget_tokens: int | None = None,
    ) -> None:
        """turns: a colocated worker's, shared with its prefill (steps and prefill chunks alternate);
        warm_tokens, budget_tokens: the slots' memory (see HostSlots)."""
        self.batch = make_batch(runner, slots, capacity, warm_tokens, budget_tokens)
        self._turns = turns
        self.on_fault: Callable[[BaseException], None] = lambda e: None  # the node's: NOT_SERVING
        self._on_step = on_step  # (batch size, step seconds), for metrics
        self._joins: queue.SimpleQueue[tuple[Sequence, KVCache]] = queue.SimpleQueue()
        self._running: list[Sequence] = []  # index == slot
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="decode-batcher", daemon=True)
        self._thread.start()

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def tokens_held(self) -> int:
        return int(self.batch.lengths[: self.batch.active].sum())

    def lease(self) -> SlotLease | None:
        """A slot for a prefill of this process to write a prompt's KV into (kvmesh/model/lease.py);
        None where the slots are not host memory."""
        return self.batch.lease()

    def submit(self, seq: Sequence, kv: KVCache) -> None:
        """Join at the next step (or when a slot frees); a LeasedKV joins in its slot."""
        if isinstance(kv, LeasedKV) and kv.lease.hand_over() is None:
            raise KvmeshError("a leased slot was given back before its sequence joined")  # a bug: INTERNAL
        self._joins.put((seq, kv))
        self._wake.set()

    def cancel(self, seq: Sequence) -> None:
        """Leave at the next step; its slot and KV are freed then."""
        seq.cancelled = True
        self._wake.set()

    def close(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join()

    def _loop(self) -> None:
        waiting: list[tuple[Sequence, KVCache]] = []
        while not self._stop:
            try:
                while not self._joins.empty():
                    waiting.append(self._joins.get())
                waiting = self._admit(waiting)
                self._drop_cancelled()
                if not self._running:
                    self._wake.wait(0.5 if not waiting else 0.005)
                    self._wake.clear()
                    continue
                self._step()
            except Exception as e:  # a failed step or admission ends the sequences in it, never the loop
                log.exception("decode step failed")
                self.on_fault(e)
                for seq in [*self._running, *(s for s, _ in waiting)]:
                    seq.emit(("end", "error"))
                self._give_back(waiting)
                for seq in list(self._running):
                    self._leave(seq, keep=False)  # after a failed step its KV is not trusted
                waiting = []

    def _admit(self, waiting: list[tuple[Sequence, KVCache]]) -> list[tuple[Sequence, KVCache]]:
        """Sequences whose KV is in a lent slot join first, in the order lent (the prefill queue
        was fair already). Then free slots go to the others, fairly across groups: the next one is
        the earliest of the group with the fewest sequences running (a tenant with many waiting
        cannot hold every slot)."""
        rest: list[tuple[Sequence, KVCache]] = []
        for seq, kv in waiting:
            if not isinstance(kv, LeasedKV):
                rest.append((seq, kv))
            elif seq.cancelled:
                self._give_back([(seq, kv)])
            elif (slot := self._slots.join(self._slot_of(kv), kv.length)) is None:
                rest.append((seq, kv))
            else:
                seq.slot = slot
                self._running.append(seq)
        waiting = rest
        while waiting and self.batch.can_add:  # (each step: nothing to do while none waits)
            running = Counter(s.group for s in self._running)
            free = [i for i, (_, kv) in enumerate(waiting) if not isinstance(kv, LeasedKV)]
            if not free:
                break
            seq, kv = waiting.pop(min(free, key=lambda i: (running[waiting[i][0].group], i)))
            if seq.cancelled:
                continue
            seq.slot = self.batch.add(kv)
            self._running.append(seq)
        return waiting

    @staticmethod
    def _slot_of(kv: LeasedKV) -> int:
        assert kv.lease.place is not None  # hand_over() made sure
        return kv.lease.place.slot

    def _give_back(self, waiting: list[tuple[Sequence, KVCache]]) -> None:
        """The lent slots of sequences that will not join."""
        for _, kv in waiting:
            if isinstance(kv, LeasedKV):
                self._slots.give_back(self._slot_of(kv))

    @property
    def _slots(self) -> SlotBatch:
        assert isinstance(self.batch, SlotBatch)  # the only batch that lends slots
        return self.batch

    def _drop_cancelled(self) -> None:
        for seq in sorted((s for s in self._running if s.cancelled), key=lambda s: -s.slot):
            self._leave(seq)

    def _step(self) -> None:
        tokens = np.array([s.last_token for s in self._running])
        with self._turns.turn("decode") if self._turns else contextlib.nullcontext():
            start = time.perf_counter()
            logits = self.batch.step(tokens)
        done = []
        for seq, sampled in zip(self._running, _sample_all(self._running, logits), strict=True):
            if sampled is None:  # replayed: the dead node's next token, not a new one
                seq.last_token = seq.replay.pop(0)
                seq.tokens.append(seq.last_token)
                continue
            token, logprob = sampled
            seq.remaining -= 1
            if token in seq.eos:
                seq.emit(("end", "eos"))
                done.append(seq)
                continue
            seq.emit((token, logprob))
            seq.last_token = token
            seq.tokens.append(token)
            if seq.remaining <= 0:
                seq.emit(("end", "length"))
                done.append(seq)
        self._on_step(len(self._running), time.perf_counter() - start)
        if self.batch.reads_in_place:  # device slots: a sequence's blocks go only as it leaves
            for seq in self._running:
                if seq.keep is not None:
                    self._send_blocks(seq, seq.keep)
        for seq in sorted(done, key=lambda s: -s.slot):  # highest slot first: the last one moves
            self._leave(seq)

    def _leave(self, seq: Sequence, keep: bool = True) -> None:
        if keep and seq.keep is not None:
            self._send_blocks(seq, seq.keep)
            seq.keep.send(seq.tokens, seq.keep.first, None)
        moved = self.batch.remove(seq.slot)
        if moved is not None:
            mover = self._running[moved]
            self._running[seq.slot], mover.slot = mover, seq.slot
        self._running.pop()
        seq.slot = -1

    def _send_blocks(self, seq: Sequence, keep: KeepKV) -> None:
        """Copy the blocks the sequence filled since the last send out of its slot, while they are
        where it left them (the one part of a write-back on this thread: a copy of what is sent,
        ~0.1 ms a block of SmolLM2)."""
        full = int(self.batch.lengths[seq.slot]) // keep.block
        if full <= keep.first:
            return
        start, end = keep.first * keep.block, full * keep.block
        kv = self.batch.read(seq.slot, end)
        part = KVCache([k[:, :, start:end].copy() for k in kv.keys], [v[:, :, start:end].copy() for v in kv.values])
        keep.send(seq.tokens[:end], keep.first, part)
        keep.first = full


def _sample_all(running: list[Sequence], logits: np.ndarray) -> list[tuple[int, float] | None]:
    """Each row's (token, logprob), None for a row being replayed: greedy rows all at once
    (argmax, logsumexp over (B, vocab)), the others by their own sampler."""
    out: list[tuple[int, float] | None] = [None] * len(running)
    greedy = [i for i, s in enumerate(running) if s.sampler.greedy and not s.replay]
    if greedy:
        # Three passes over (G, vocab), one temporary: at 64 rows of 49,152 this is the host's
        # largest per-step cost when the model runs on a GPU.
        rows = logits if len(greedy) == len(running) else logits[greedy]
        tokens = rows.argmax(axis=1)
        top = rows[np.arange(len(rows)), tokens]
        shifted = rows - top[:, None]
        np.exp(shifted, out=shifted)
        lse = top + np.log(shifted.sum(axis=1))
        for j, i in enumerate(greedy):
            out[i] = (int(tokens[j]), float(top[j] - lse[j]))
            running[i].sampler.index += 1
    for i, seq in enumerate(running):
        if not seq.sampler.greedy and not seq.replay:
            out[i] = seq.sampler.sample(logits[i])
    return out
