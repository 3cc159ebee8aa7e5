"""The prefill engine: longest cached prefix from the store, the model over the rest, the first
token. Plain and synchronous; prefill_svc.node runs it off the event loop."""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from kvmesh.blockhash import block_keys, root_key
from kvmesh.errors import InvalidArgument, KvmeshError
from kvmesh.model.kv import KVCache
from kvmesh.model.lease import LeasedKV, Place, SlotLease
from kvmesh.model.runner import ModelRunner
from kvmesh.model.turns import Turns
from kvmesh.sampling import Sampler, SamplingParams
from prefill_svc.store import EventSink, PrefixStore, StoreWriter

PUT_BATCH = 16  # blocks per store transaction of a prefill's put
# Prompts prefilled together out of place read their stored prefixes side by side into the past
# buffer, which may grow for them to this many tokens (SmolLM2: 46 KB a token, ~190 MB)
TOGETHER_PAST_TOKENS = 4096


@dataclass(frozen=True)
class PrefillOutcome:
    kv: KVCache  # the whole prompt's, per layer (1, kv_heads, tokens, head_dim) (a resumption's: see resume)
    cached_tokens: int  # taken from the store, not computed
    first_token: int
    first_logprob: float
    bad_blocks: int  # stored blocks that failed their checksum (dropped; recomputed here)
    store_read_s: float
    compute_s: float
    together: int = 1  # prompts prefilled in the same model run (prefill_together)


@dataclass(frozen=True)
class Prompt:
    """One prompt of `PrefillEngine.prefill_together`: into a lent decode slot (a colocated
    worker's), or out of place (a prefill node's)."""

    tokens: Sequence[int]
    params: SamplingParams
    keys: list[bytes]  # lookup_keys(tokens, salt)
    into: SlotLease | None = None


class PrefillEngine:
    def __init__(
        self,
        runner: ModelRunner,
        store: PrefixStore,
        writer: StoreWriter,
        fingerprint: str,
        cache: bool = True,
        turns: Turns | None = None,
        chunk_tokens: int = 0,
        reuse_decoded: bool = False,
    ) -> None:
        """turns: a colocated worker's (the model is shared with its decode batch): with
        `chunk_tokens`, the prompt runs in chunks of that many, each one between two decode steps;
        a run of several prompts together takes its turn too. reuse_decoded: prompts
        reuse blocks a decode node made with other numerics (else only a resumption does)."""
        self.reuse_decoded = reuse_decoded
        self.runner, self.store, self.writer = runner, store, writer
        self.turns, self.chunk_tokens = turns, chunk_tokens
        self.cache = cache  # off: no lookups, no writes (the no-prefix-cache baseline)
        self.fingerprint = fingerprint
        self.block_size = store.config.block_size
        # Stored blocks are read into this one buffer, reused by every request. The model copies
        # the past into its present, so the buffer is free again when prefill returns. It grows
        # on the store writer's thread, once a longer chain is stored (`reserve`): fresh memory
        # for ~92 MB of KV faults in at ~0.5 GB/s, ~200 ms on the first request that read it.
        self._past_buffer = np.empty(0, runner.layout.dtype)
        # Blocks queued for the writer, readable from memory until written: a prefill that needs
        # them (the same new prefix again, a reply just written back) takes them from here. The
        # writer waits for a quiet node; under a busy decode batch (a colocated worker, 4
        # streams) waiting for it took > 2 s and the prefix was computed again (3.2 s -> 6.4 s).
        # (block, decoded: a decode node's KV with other numerics, see PrefixStore)
        self._pending: dict[bytes, tuple[Callable[[], np.ndarray], bool]] = {}
        self._pending_lock = threading.Lock()

    def keys(self, tokens: Sequence[int], salt: bytes) -> list[bytes]:
        return block_keys(root_key(self.fingerprint, self.block_size, salt), tokens, self.block_size)

    def lookup_keys(self, tokens: Sequence[int], salt: bytes) -> list[bytes]:
        """The keys a prefill looks up and stores (none without the prefix cache)."""
        return self.keys(tokens, salt) if self.cache else []

    def uncached_tokens(self, tokens: Sequence[int], salt: bytes, keys: list[bytes] | None = None) -> int:
        """What a prefill of `tokens` would compute if run now: the store's prefix is reused, the
        last prompt token always computed. `keys`: lookup_keys(tokens, salt), if already made."""
        keys = self.lookup_keys(tokens, salt) if keys is None else keys
        cached = self.store.cached_blocks(keys, self.reuse_decoded) * self.block_size if keys else 0
        return len(tokens) - min(cached, len(tokens) - 1)

    def prefill(
        self,
        tokens: Sequence[int],
        params: SamplingParams,
        salt: bytes = b"",
        keys: list[bytes] | None = None,
        replay: int = 0,
        into: SlotLease | None = None,
    ) -> PrefillOutcome:
        """`keys`: lookup_keys(tokens, salt), if the caller made them already. `replay` > 0: a
        resumption (see `resume`). `into`: a decode slot of this process to prefill in place
        (a colocated worker's; the outcome's KV is then a LeasedKV), where one is free."""
        self._check(tokens, replay)
        keys = self.lookup_keys(tokens, salt) if keys is None else keys
        if replay:
            return self.resume(tokens, len(tokens) - replay, keys)
        place = into.take() if into is not None else None  # a decode slot: prefilled in place
        if into is not None and place is not None:
            result = self._in_place([(Prompt(tokens, params, keys, into), place)])[0]
            if isinstance(result, BaseException):
                raise result
            return result
        start = time.perf_counter()
        past, cached, bad = self._cached_past(keys, len(tokens), self.reuse_decoded) if keys else (None, 0, 0)
        read = time.perf_counter()
        logits, kv = self._run(tokens[cached:], past)
        token, logprob = Sampler(params).sample(logits)
        if keys:
            self._store_prompt(keys, kv, in_slot=False, cached=cached)
        return PrefillOutcome(kv, cached, token, logprob, bad, read - start, time.perf_counter() - read)

    def _check(self, tokens: Sequence[int], replay: int) -> None:
        if not tokens:
            raise InvalidArgument("empty prompt")
        if len(tokens) >= self.runner.max_context:
            raise InvalidArgument(
                f"prompt of {len(tokens)} tokens does not fit the context of {self.runner.max_context}"
            )
        if not 0 <= replay < len(tokens):
            raise InvalidArgument(f"replay_tokens {replay} must be below the {len(tokens)} tokens sent")
        self.runner.check_tokens(tokens)

    @property
    def can_group(self) -> bool:
        """Whether prefill_together runs its prompts in one model run (the runner has the group
        graph, and no decode steps take turns with the prefill)."""
        return self.runner.group_session is not None and not self.chunk_tokens

    def prefill_together(self, jobs: list[Prompt]) -> list[PrefillOutcome | BaseException]:
        """Several prompts' prefill, the model run once for all of them: the exact graph's linear
        layers cost ~55 ms a run of 2+ rows however few (2 cores), so seven warm joins' last tokens
        take one run, not seven. Each prompt's KV is what it alone would make (bit for bit where it
        computes 2+ tokens). Those with a lent decode slot are prefilled in place there
        (`ModelRunner.prefill_group_in_place`), the others (no slot free, its request left, a
        prefill node's) out of place (`ModelRunner.prefill_group`). -> per job its outcome, or
        the error it failed with (one job's failure is its own)."""
        results: list[PrefillOutcome | BaseException | None] = [None] * len(jobs)
        slotted: list[tuple[int, Prompt, Place]] = []
        plain: list[tuple[int, Prompt]] = []
        for i, job in enumerate(jobs):
            try:
                self._check(job.tokens, 0)
                place = job.into.take() if job.into is not None else None
                if place is None:
                    plain.append((i, job))
                else:
                    slotted.append((i, job, place))
            except Exception as e:
                results[i] = e
        for (i, _, _), result in zip(slotted, self._in_place([(job, place) for _, job, place in slotted]), strict=True):
            results[i] = result
        for (i, _), result in zip(plain, self._out_of_place([job for _, job in plain]), strict=True):
            results[i] = result
        return _filled(results)

    def _out_of_place(self, jobs: list[Prompt]) -> list[PrefillOutcome | BaseException]:
        """Prompts prefilled out of place, in runs of the group graph: each run's stored prefixes
        read side by side into the past buffer, once for prompts that share one (a system
        prompt); those that do not fit beside the others run in the next run, one that does not
        fit alone runs alone, as `prefill`. A buffer too small for them all grows for the next
        prompts (this call keeps the one it found)."""
        buffer = self._past_buffer
        lay = self.runner.layout
        room = buffer.size // (lay.layers * 2 * lay.kv_heads * lay.head_dim)  # tokens
        chains = [job.keys[: self._stored_blocks(job.keys)] for job in jobs]
        if (need := self._tokens_of(_distinct(chains))) > room and need <= TOGETHER_PAST_TOKENS:
            self.writer.submit(lambda store, events: self.reserve(need))
        results: list[PrefillOutcome | BaseException] = []
        i = 0
        while i < len(jobs):
            start = i
            while i < len(jobs) and i - start < self.runner.group_segments:
                if i > start and self._tokens_of(_distinct(chains[start : i + 1])) > room:
                    break
                i += 1
            run, read = list(zip(jobs[start:i], chains[start:i], strict=True)), _distinct(chains[start:i])
            if len(run) == 1 or self._tokens_of(read) > room:
                results += [self._alone(job) for job, _ in run]
                continue
            try:
                results += self._run_out_of_place(run, read, buffer)
            except Exception as e:
                results += [e] * len(run)
        return results

    def _tokens_of(self, chains: list[list[bytes]]) -> int:
        return sum(len(c) for c in chains) * self.block_size

    def _alone(self, job: Prompt) -> PrefillOutcome | BaseException:
        try:
            return self.prefill(job.tokens, job.params, keys=job.keys)
        except Exception as e:
            return e

    def _run_out_of_place(
        self, run: list[tuple[Prompt, list[bytes]]], chains: list[list[bytes]], buffer: np.ndarray
    ) -> list[PrefillOutcome | BaseException]:
        """One group run over prompts (each with the stored chain it reads) whose distinct
        `chains` fit `buffer` side by side."""
        lay, bs = self.runner.layout, self.block_size
        start, offset = time.perf_counter(), 0
        pasts: list[tuple[list[bytes], KVCache | None, int, int]] = []  # chain, its KV, tokens read, bad blocks
        for chain in chains:
            # (layers, 2, kv_heads, the chain's tokens, head_dim), contiguous, beside the others'
            shape = (lay.layers, 2, lay.kv_heads, len(chain) * bs, lay.head_dim)
            region = buffer[offset : offset + int(np.prod(shape))].reshape(shape)
            offset += region.size
            past, n, bad = self._cached_past(chain, len(chain) * bs + 1, self.reuse_decoded, region)
            pasts.append((chain, past, n, bad))
        rows: list[tuple[Sequence[int], KVCache | None]] = []
        reads: list[tuple[int, int]] = []  # cached tokens, bad blocks
        for job, chain in run:
            kv, n, bad = next(((kv, n, bad) for c, kv, n, bad in pasts if _extends(c, chain)), (None, 0, 0))
            cached = min(n, len(chain) * bs, len(job.tokens) - 1)  # the last token always computed
            past = kv.prefix(cached) if kv is not None and cached else None
            cached = cached if past is not None else 0
            rows.append((job.tokens[cached:], past))
            reads.append((cached, bad))
        read = time.perf_counter()
        logits, kvs = self.runner.prefill_group(rows)
        compute_s = time.perf_counter() - read
        results: list[PrefillOutcome | BaseException] = []
        for (job, _), row_logits, kv, (cached, bad) in zip(run, logits, kvs, reads, strict=True):
            try:
                token, logprob = Sampler(job.params).sample(row_logits)
                if job.keys:
                    self._store_prompt(job.keys, kv, in_slot=False, cached=cached)
                results.append(PrefillOutcome(kv, cached, token, logprob, bad, read - start, compute_s, len(run)))
            except Exception as e:
                results.append(e)
        return results

    def _chain(self, keys: list[bytes], decoded: bool) -> tuple[int, list[Callable[[], np.ndarray]]]:
        """How far `keys` are stored now: the blocks in the store, then those still queued for the
        writer (their values, from memory). decoded: a decode node's blocks count too."""
        n = self.store.cached_blocks(keys, decoded)
        queued: list[Callable[[], np.ndarray]] = []
        with self._pending_lock:
            for key in keys[n:]:
                block, made_by_decode = self._pending.get(key, (None, False))
                if block is None or (made_by_decode and not decoded):
                    break
                queued.append(block)
        return n, queued

    def _stored_blocks(self, keys: list[bytes]) -> int:
        """Blocks of `keys` a prefill would read now: stored, or queued for the writer."""
        n, queued = self._chain(keys, self.reuse_decoded)
        return n + len(queued)

    def _in_place(self, rows: list[tuple[Prompt, Place]]) -> list[PrefillOutcome | BaseException]:
        """Prompts into their decode slots (taken from their leases): the stored prefix read into
        the slot, the rest run there in place, one model run for all where there are several."""
        results: list[PrefillOutcome | BaseException | None] = [None] * len(rows)
        reads: list[tuple[int, int, float]] = []  # per row: cached tokens, bad blocks, read seconds
        try:
            for i, (job, place) in enumerate(rows):
                start = time.perf_counter()
                try:
                    place.ensure(len(job.tokens) + 1)
                    _, cached, bad = (
                        self._cached_past(job.keys, len(job.tokens), self.reuse_decoded, place.blocks)
                        if job.keys
                        else (None, 0, 0)
                    )
                except Exception as e:
                    results[i] = e
                reads.append((0, 0, 0.0) if results[i] else (cached, bad, time.perf_counter() - start))
            live = [i for i in range(len(rows)) if results[i] is None]
            start = time.perf_counter()
            try:
                logits = self._compute_in_place([(rows[i][0].tokens, rows[i][1].buffers, reads[i][0]) for i in live])
            except Exception as e:
                results = [e if r is None else r for r in results]
                live = []
            compute_s = time.perf_counter() - start
            for i, row_logits in zip(live, logits if live else [], strict=True):
                (job, place), (cached, bad, read_s) = rows[i], reads[i]
                try:
                    token, logprob = Sampler(job.params).sample(row_logits)
                    kv = place.kv(len(job.tokens))
                    if job.keys:
                        self._store_prompt(job.keys, kv, in_slot=True, cached=cached)
                    kv = LeasedKV(kv.keys, kv.values, _lease(job))
                    results[i] = PrefillOutcome(kv, cached, token, logprob, bad, read_s, compute_s, len(live))
                except Exception as e:
                    results[i] = e
        finally:
            for (job, _), result in zip(rows, results, strict=True):
                _lease(job).written(isinstance(result, PrefillOutcome))
        return _filled(results)

    def _compute_in_place(self, rows: list[tuple[Sequence[int], list[np.ndarray], int]]) -> list[np.ndarray]:
        """rows (tokens, a slot's buffers, the past they hold) -> each row's last logits (vocab,)."""
        if len(rows) == 1:
            tokens, buffers, past = rows[0]
            return [self._run_in_place(tokens, past, buffers)]
        k, out = self.runner.group_segments, list[np.ndarray]()
        for start in range(0, len(rows), k):
            # Its turn between two decode steps: beside them, both ran 2-3x slower on 2 cores (7
            # one-token tails: ~100 ms alone, 230-265 ms beside a stream's steps)
            with self.turns.turn("prefill") if self.turns else contextlib.nullcontext():
                out.extend(self.runner.prefill_group_in_place([(t[p:], b, p) for t, b, p in rows[start : start + k]]))
        return out

    def _store_prompt(self, keys: list[bytes], kv: KVCache, in_slot: bool, cached: int) -> None:
        """A prefilled prompt's full blocks to the writer. In a decode slot only the blocks from
        the first one computed, copied: the slot is the batch's once the sequence joins, and the
        writer runs later. (1, kv_heads, tokens, head_dim) a layer."""
        bs = self.block_size
        if not in_slot:
            self._store(keys, _block_of(kv, bs), None, len(keys))
        elif (first := cached // bs) < len(keys):
            new = slice(first * bs, len(keys) * bs)
            part = KVCache([k[:, :, new].copy() for k in kv.keys], [v[:, :, new].copy() for v in kv.values])
            self._store(keys[first:], _block_of(part, bs), keys[first - 1] if first else None, len(keys))

    def resume(self, tokens: Sequence[int], prompt: int, keys: list[bytes]) -> PrefillOutcome:
        """A migrated sequence: `tokens` = its prompt (the first `prompt`) + the output it made. The
        KV of the longest stored prefix short of the last token (a decode node's write-back holds
        the output's blocks), or of the prompt where that is longer (its uncached part computed,
        as the first prefill did). No token is drawn: the decode node runs the rest through its
        own decode steps, and samples the next one."""
        start = time.perf_counter()
        past, cached, bad = self._cached_past(keys, len(tokens), decoded=True) if keys else (None, 0, 0)
        read = time.perf_counter()
        if cached >= prompt and past is not None:  # the reused buffer is the next request's: copied
            kv = KVCache([k.copy() for k in past.keys], [v.copy() for v in past.values])
        else:
            _, kv = self._run(tokens[cached:prompt], past)
            if computed := keys[: prompt // self.block_size]:
                self._store(computed, _block_of(kv, self.block_size), None, len(computed))
        return PrefillOutcome(kv, cached, 0, 0.0, bad, read - start, time.perf_counter() - read)

    def store_kv(
        self, tokens: Sequence[int], salt: bytes, first_block: int, kv: KVCache | None, decoded: bool = False
    ) -> int:
        """KV made elsewhere (a decode node's: prompt and reply) for the full blocks of `tokens` from
        `first_block` on, `kv` holding exactly those (None: none): queued for the store below the
        blocks before (stored when those still are); `decoded`: made with other numerics than this
        prefill's (kept for resumptions until recomputed). -> blocks queued."""
        chain = self.lookup_keys(tokens, salt)
        keys = chain[first_block:]
        if not keys or kv is None:
            return 0
        parent = chain[first_block - 1] if first_block else None
        self._store(keys, _block_of(kv, self.block_size), parent, len(chain), decoded)
        return len(keys)

    def recompute(self, tokens: Sequence[int], salt: bytes, max_tokens: int) -> int:
        """The next blocks of `tokens` (full blocks) after its longest exact stored prefix, at most
        `max_tokens` of them, computed by this exact prefill and stored in place of a decode node's
        (a finished sequence's reply: the next turn reads what a prefill would make). -> blocks
        computed; 0: nothing left to recompute (or the chain is gone: its blocks were evicted)."""
        keys = self.lookup_keys(tokens, salt)
        if self.store.cached_blocks(keys) == len(keys):  # a next turn computed them: no past to read
            return 0
        past, cached, _ = self._cached_past(keys, len(tokens) + 1)
        done = cached // self.block_size
        if done == len(keys) or (done == 0 and self.store.cached_blocks(keys[:1], decoded=True) == 0):
            return 0
        end = min(len(keys), done + max(1, max_tokens // self.block_size)) * self.block_size
        _, kv = self._run(tokens[cached:end], past)
        new = keys[done : end // self.block_size]
        # kv: the past's tokens and these, (1, kv_heads, end, head_dim) a layer
        self._store(new, _shifted(_block_of(kv, self.block_size), done), keys[done - 1] if done else None, len(keys))
        return len(new)

    def _store(
        self,
        keys: list[bytes],
        value: Callable[[int], np.ndarray],
        parent: bytes | None,
        chain: int,
        decoded: bool = False,
    ) -> None:
        """Queue a chain of blocks for the writer, below `parent`; `chain`: blocks from the root.
        Until written, prefills read them from memory (`_pending`)."""
        blocks = [(functools.partial(value, i), decoded) for i in range(len(keys))]
        with self._pending_lock:
            for key, block in zip(keys, blocks, strict=True):
                if key not in self._pending or (self._pending[key][1] and not decoded):
                    self._pending[key] = block

        def job(store: PrefixStore, events: EventSink) -> None:
            # In transactions of PUT_BATCH blocks (~11 MB, ~15 ms), pausing between them for
            # requests that arrived: a 2,000-token prompt's put would otherwise hold a core
            # for ~130 ms against them.
            try:
                below = parent
                for start in range(0, len(keys), PUT_BATCH):
                    if start:
                        self.writer.pause()
                    batch = keys[start : start + PUT_BATCH]
                    if not store.put(batch, _shifted(value, start), events, below, decoded):
                        return
                    below = batch[-1]
                self.reserve(chain * self.block_size)  # the next request reads them at once
            finally:
                with self._pending_lock:
                    for key, block in zip(keys, blocks, strict=True):
                        if self._pending.get(key) is block:
                            del self._pending[key]

        self.writer.submit(job, keys)

    def _run(self, tokens: Sequence[int], past: KVCache | None) -> tuple[np.ndarray, KVCache]:
        """The model over `tokens` after `past`: at once, or chunk by chunk taking turns with the
        decode steps. A chunk of 2 or more tokens after a past gives the logits and KV of one run
        (a last chunk of 1 would take another kernel path: it joins the one before)."""
        if self.turns is None or not self.chunk_tokens:
            return self.runner.prefill(tokens, past)
        for start, end in self._chunks(len(tokens)):
            with self.turns.turn("prefill"):
                logits, past = self.runner.prefill(tokens[start:end], past)
        assert past is not None
        return logits, past

    def _run_in_place(self, tokens: Sequence[int], past: int, buffers: list[np.ndarray]) -> np.ndarray:
        """_run for tokens[past:] in a slot's buffers that hold the first `past`. -> last logits."""
        if self.turns is None or not self.chunk_tokens:
            return self.runner.prefill_in_place(tokens[past:], buffers, past)
        for start, end in self._chunks(len(tokens) - past):
            with self.turns.turn("prefill"):
                logits = self.runner.prefill_in_place(tokens[past + start : past + end], buffers, past + start)
        return logits

    def _chunks(self, n: int) -> list[tuple[int, int]]:
        """[start, end) of each chunk of n tokens taking turns with decode steps."""
        size = self.chunk_tokens or n
        bounds = list(range(0, n, size))
        if len(bounds) > 1 and n - bounds[-1] == 1:
            bounds.pop()
        return list(zip(bounds, [*bounds[1:], n], strict=True))

    def _cached_past(
        self, keys: list[bytes], prompt_len: int, decoded: bool = False, into: np.ndarray | None = None
    ) -> tuple[KVCache | None, int, int]:
        """KV of the longest stored prefix, capped one token short of the prompt: the last prompt
        token always runs through the model, for the logits of the first new token. decoded: a
        resumption's, taking a decode node's blocks too (else the prefix stops before them).
        into: (layers, 2, kv_heads, >= the prompt, head_dim) to read into (a decode slot), else
        the past buffer."""
        n, queued = self._chain(keys, decoded)
        if n + len(queued) == 0:
            return None, 0, 0
        lay, bs = self.runner.layout, self.block_size
        shape = (lay.layers, 2, lay.kv_heads, (n + len(queued)) * bs, lay.head_dim)
        if into is None:
            self.reserve(shape[3])  # a no-op unless the writer has not grown it yet
            out = self._past_buffer[: np.prod(shape)].reshape(shape)  # contiguous: the model takes it as is
        else:
            out = into
        n_ok, bad = self.store.read(keys[:n], out)
        if bad:  # a corrupt value: drop it and everything below it, recompute from here
            corrupt = bad[0]
            self.writer.submit(lambda store, events: store.drop(corrupt, events))
        if n_ok == n:
            for i, block in enumerate(queued, start=n):
                out[:, :, :, i * bs : (i + 1) * bs] = block()
            n_ok += len(queued)
        cached = min(n_ok * self.block_size, prompt_len - 1)
        if cached == 0:
            return None, 0, len(bad)
        # (layers, 2, kvh, T, hd) -> per layer (1, kvh, cached, hd) views
        return (
            KVCache(
                [out[i, 0, None, :, :cached] for i in range(lay.layers)],
                [out[i, 1, None, :, :cached] for i in range(lay.layers)],
            ),
            cached,
            len(bad),
        )

    def reserve(self, tokens: int) -> None:
        """Make the past buffer hold `tokens` stored tokens, its pages touched now. Any thread: a
        request that took the old buffer keeps it; the swap is one reference."""
        lay = self.runner.layout
        size = lay.layers * 2 * lay.kv_heads * tokens * lay.head_dim
        if self._past_buffer.size >= size:
            return
        grown = np.empty(size * 5 // 4, lay.dtype)
        grown.fill(0)  # fault every page in here
        self._past_buffer = grown

    def pin(self, tokens: Sequence[int], salt: bytes = b"") -> int:
        """Prefill (what is not stored), store and pin the prompt's full blocks. -> pinned tokens."""
        keys = self.keys(tokens, salt)
        if not keys:
            raise InvalidArgument(f"a pinned prompt needs at least one full block of {self.block_size} tokens")
        self.prefill(tokens, SamplingParams())
        done: list[int] = []
        self.writer.submit(lambda store, events: done.append(store.pin(keys, events)))
        self.writer.flush()
        if not done:
            raise KvmeshError("the prefix store writer failed to pin the prompt")  # INTERNAL
        return done[0] * self.block_size


def _distinct(chains: list[list[bytes]]) -> list[list[bytes]]:
    """The chains to read so that every one of `chains` is a prefix of one read (empty ones need none)."""
    out: list[list[bytes]] = []
    for chain in sorted(chains, key=len, reverse=True):
        if chain and not any(_extends(c, chain) for c in out):
            out.append(chain)
    return out


def _extends(longer: list[bytes], chain: list[bytes]) -> bool:
    return longer[: len(chain)] == chain


def _filled(results: list[PrefillOutcome | BaseException | None]) -> list[PrefillOutcome | BaseException]:
    """Every job's outcome or error, each set once above."""
    assert all(r is not None for r in results)
    return [r for r in results if r is not None]


def _lease(job: Prompt) -> SlotLease:
    """The lease of a prompt prefilled in place (it took its slot from it)."""
    assert job.into is not None
    return job.into


def _block_of(kv: KVCache, block_size: int) -> Callable[[int], np.ndarray]:
    """Block i's value, (layers, 2, kv_heads, block_size, head_dim), cut from per-layer arrays."""

    def value(i: int) -> np.ndarray:
        s = slice(i * block_size, (i + 1) * block_size)
        return np.stack([np.stack([k[0, :, s], v[0, :, s]]) for k, v in zip(kv.keys, kv.values, strict=True)])

    return value


def _shifted(value: Callable[[int], np.ndarray], start: int) -> Callable[[int], np.ndarray]:
    """Block i of a batch that starts at block `start` of the prompt."""
    return lambda i: value(start + i)
