"""The prefix store under the prefill engine, on the tiny model and a real LMDB in a temp dir."""

from pathlib import Path

import numpy as np
import pytest

from kvmesh.errors import InvalidArgument, ModelError
from kvmesh.model.folder import ModelFolder
from kvmesh.model.kv import KVCache
from kvmesh.model.runner import ModelRunner, RunnerConfig
from kvmesh.sampling import SamplingParams
from prefill_svc.engine import PUT_BATCH, PrefillEngine, PrefillOutcome, Prompt
from prefill_svc.store import Meta, PrefixStore, StoreConfig, StoreWriter
from tests.prefill_svc.conftest import BLOCK, EngineFactory

PROMPT = [int(t) for t in np.random.default_rng(5).integers(0, 256, 44)]  # 5 full blocks + 4
GREEDY = SamplingParams()


def _same(a: PrefillOutcome, b: PrefillOutcome) -> None:
    assert a.first_token == b.first_token
    assert a.first_logprob == pytest.approx(b.first_logprob, abs=1e-5)
    assert a.kv.length == b.kv.length
    for x, y in zip(a.kv.keys + a.kv.values, b.kv.keys + b.kv.values, strict=True):
        np.testing.assert_allclose(x, y, atol=1e-5)


def _settle(engine: PrefillEngine) -> None:
    engine.writer.flush()


def test_miss_then_hit_gives_the_full_prefill(make_engine: EngineFactory) -> None:
    engine, events = make_engine()
    cold = engine.prefill(PROMPT, GREEDY)
    assert cold.cached_tokens == 0
    _settle(engine)
    assert events.log == [("stored", engine.keys(PROMPT, b""))]
    warm = engine.prefill(PROMPT, GREEDY)
    assert warm.cached_tokens == 5 * BLOCK
    _same(warm, cold)


def test_without_the_prefix_cache_every_prompt_is_computed_whole(make_engine: EngineFactory) -> None:
    engine, events = make_engine(cache=False)
    first = engine.prefill(PROMPT, GREEDY)
    _settle(engine)
    again = engine.prefill(PROMPT, GREEDY)
    assert (first.cached_tokens, again.cached_tokens) == (0, 0)
    assert engine.uncached_tokens(PROMPT, b"") == len(PROMPT)
    assert events.log == [] and engine.store.stats()[1] == 0  # nothing stored, nothing announced
    _same(again, first)


def test_a_prefix_still_waiting_to_be_written_is_read_from_memory_not_recomputed(make_engine: EngineFactory) -> None:
    engine, events = make_engine(busy=True)
    first = engine.prefill(PROMPT, GREEDY)
    assert engine.writer.pending == 1 and events.log == []  # the put waits for a quiet moment
    again = engine.prefill(PROMPT, GREEDY)  # the same prompt at once: its queued blocks are reused
    assert again.cached_tokens == 5 * BLOCK and events.log == []  # not waiting for the writer
    _same(again, first)
    engine.writer.close()  # runs what is queued at once
    assert events.log[0] == ("stored", engine.keys(PROMPT, b"")) and not engine._pending


def test_partial_hit_reuses_the_shared_blocks(make_engine: EngineFactory) -> None:
    engine, _ = make_engine()
    engine.prefill(PROMPT, GREEDY)
    _settle(engine)
    other = [*PROMPT[: 2 * BLOCK + 3], 7, 7, 7, 7, 7, 7, 7, 7, 7]
    hit = engine.prefill(other, GREEDY)
    assert hit.cached_tokens == 2 * BLOCK
    _settle(engine)
    _same(hit, make_engine(path=engine.store.config.path.with_name("fresh"))[0].prefill(other, GREEDY))


@pytest.mark.parametrize(("length", "cached"), [(BLOCK - 3, 0), (3 * BLOCK, 3 * BLOCK - 1), (3 * BLOCK + 1, 3 * BLOCK)])
def test_short_exact_and_one_past_a_block(make_engine: EngineFactory, length: int, cached: int) -> None:
    engine, _ = make_engine()
    prompt = PROMPT[:length]
    cold = engine.prefill(prompt, GREEDY)
    _settle(engine)
    assert engine.store.cached_blocks(engine.keys(prompt, b"")) == length // BLOCK
    warm = engine.prefill(prompt, GREEDY)
    assert warm.cached_tokens == cached  # an exact multiple recomputes its last token
    _same(warm, cold)


def test_no_hit_across_salts(make_engine: EngineFactory) -> None:
    engine, _ = make_engine()
    engine.prefill(PROMPT, GREEDY, salt=b"tenant-a")
    _settle(engine)
    assert engine.prefill(PROMPT, GREEDY, salt=b"tenant-b").cached_tokens == 0
    assert engine.prefill(PROMPT, GREEDY, salt=b"tenant-a").cached_tokens == 5 * BLOCK


def test_another_models_store_is_refused(make_engine: EngineFactory) -> None:
    engine, _ = make_engine()
    engine.prefill(PROMPT, GREEDY)
    _settle(engine)
    engine.writer.close()
    engine.store.close()
    with pytest.raises(ModelError, match="another model"):
        make_engine(path=engine.store.config.path, fingerprint="some-other-model")


def _assert_no_orphans(engine: PrefillEngine) -> None:
    with engine.store.env.begin() as txn:
        for key, raw in txn.cursor(db=engine.store.meta):
            parent = Meta.unpack(raw).parent
            assert parent == bytes(16) or txn.get(parent, db=engine.store.meta) is not None, key.hex()


def test_eviction_keeps_the_budget_and_never_orphans(make_engine: EngineFactory) -> None:
    block_bytes = 2 * 2 * 2 * BLOCK * 16 * 4  # layers, k/v, kv heads, tokens, head_dim, fp32
    engine, events = make_engine(budget_bytes=7 * block_bytes)
    rng = np.random.default_rng(1)
    for i in range(12):
        shared = PROMPT[: BLOCK * (i % 3)]  # some prompts share leading blocks
        engine.prefill(shared + [int(t) for t in rng.integers(0, 256, 3 * BLOCK)], GREEDY)
        _settle(engine)
        total, blocks, _ = engine.store.stats()
        assert total <= 7 * block_bytes and total == blocks * block_bytes
        _assert_no_orphans(engine)
    evicted = [k for kind, keys in events.log if kind == "evicted" for k in keys]
    assert evicted and not set(evicted) & set(engine.store.keys())


def test_corrupt_value_is_dropped_and_recomputed(make_engine: EngineFactory) -> None:
    engine, events = make_engine()
    cold = engine.prefill(PROMPT, GREEDY)
    _settle(engine)
    keys = engine.keys(PROMPT, b"")
    with engine.store.env.begin(write=True) as txn:  # flip one byte of block 2's stored value
        value = bytearray(txn.get(keys[2], db=engine.store.blocks))
        value[100] ^= 0xFF
        txn.put(keys[2], bytes(value), db=engine.store.blocks)
    hit = engine.prefill(PROMPT, GREEDY)
    assert (hit.cached_tokens, hit.bad_blocks) == (2 * BLOCK, 1)
    _same(hit, cold)  # never served: recomputed from block 2 on
    _settle(engine)
    dropped = events.log.index(("evicted", keys[2:]))  # the bad block and everything below it
    assert events.log[dropped + 1] == ("stored", keys[2:])  # then the recomputed ones
    again = engine.prefill(PROMPT, GREEDY)
    assert (again.cached_tokens, again.bad_blocks) == (5 * BLOCK, 0)


def test_pinned_prefix_survives_eviction_pressure_and_restart(make_engine: EngineFactory) -> None:
    block_bytes = 2 * 2 * 2 * BLOCK * 16 * 4
    engine, events = make_engine(budget_bytes=8 * block_bytes)
    assert engine.pin(PROMPT) == 5 * BLOCK
    assert ("pinned", engine.keys(PROMPT, b"")) in events.log
    rng = np.random.default_rng(2)
    for _ in range(6):
        engine.prefill([int(t) for t in rng.integers(0, 256, 3 * BLOCK)], GREEDY)
        _settle(engine)
    assert engine.store.cached_blocks(engine.keys(PROMPT, b"")) == 5
    assert engine.store.stats()[2] == 5
    path = engine.store.config.path
    engine.writer.close()
    engine.store.close()
    restarted, _ = make_engine(path=path, budget_bytes=8 * block_bytes)
    assert restarted.prefill(PROMPT, GREEDY).cached_tokens == 5 * BLOCK


def test_a_store_cannot_hold_a_wrong_size_block(make_engine: EngineFactory) -> None:
    engine, _ = make_engine()
    with pytest.raises(InvalidArgument, match="block value"):
        engine.store.put([b"k" * 16], lambda _: np.zeros(3, np.float32), lambda *_: None)
    assert engine.store.stats() == (0, 0, 0)


def test_the_read_buffer_grows_off_the_request_path(make_engine: EngineFactory) -> None:
    """Once a chain is stored, the buffer a later hit reads it into is already big enough: the
    writer grew it (and touched its pages), not the request."""
    engine, _ = make_engine()
    engine.prefill(PROMPT, GREEDY)
    _settle(engine)
    lay = engine.runner.layout
    grown = engine._past_buffer
    assert grown.size >= lay.layers * 2 * lay.kv_heads * 5 * BLOCK * lay.head_dim
    warm = engine.prefill(PROMPT, GREEDY)
    assert warm.cached_tokens == 5 * BLOCK and engine._past_buffer is grown


def test_a_long_prompt_is_stored_in_batches_as_one_chain(make_engine: EngineFactory) -> None:
    """More blocks than one transaction holds: stored batch by batch, each below the last."""
    engine, events = make_engine()
    long = [int(t) for t in np.random.default_rng(9).integers(0, 256, (PUT_BATCH + 5) * BLOCK + 3)]
    cold = engine.prefill(long, GREEDY)
    _settle(engine)
    keys = engine.keys(long, b"")
    stored = [k for kind, batch in events.log if kind == "stored" for k in batch]
    assert stored == keys and len([kind for kind, _ in events.log if kind == "stored"]) == 2
    _assert_no_orphans(engine)
    warm = engine.prefill(long, GREEDY)
    assert warm.cached_tokens == len(keys) * BLOCK
    _same(warm, cold)


def test_a_write_pauses_between_transactions_while_requests_run() -> None:
    """StoreWriter.pause inside a job holds the write back while the node is busy, until it is
    quiet again; with a node never quiet, it gives way at the job's deadline."""
    import threading

    busy = [False]
    writer = StoreWriter(None, lambda *_: None, lambda: not busy[0], max_wait_s=60.0)  # type: ignore[arg-type]
    seen: list[bool] = []

    def job(_store: object, _events: object) -> None:
        busy[0] = True  # a request arrives during the first transaction, and ends a little later
        threading.Timer(0.1, lambda: busy.__setitem__(0, False)).start()
        writer.pause()
        seen.append(busy[0])  # still busy here: pause gave way too early

    writer.submit(job)
    writer.flush()
    writer.close()
    assert seen == [False]

    never = StoreWriter(None, lambda *_: None, lambda: False, max_wait_s=0.1)  # type: ignore[arg-type]
    ran: list[bool] = []
    never.submit(lambda _s, _e: (never.pause(), ran.append(True)))
    never.flush()  # returns: the deadline lets the job and its pause through
    never.close()
    assert ran == [True]


def test_a_float16_model_stores_its_kv_as_float16(tiny_int4_f16: ModelFolder, tmp_path: Path) -> None:
    """The CUDA graph's KV (float16) is stored and read back bit for bit, at half the bytes."""
    runner = ModelRunner(tiny_int4_f16, RunnerConfig(threads=1))
    store = PrefixStore(StoreConfig(tmp_path / "store", block_size=BLOCK), tiny_int4_f16.fingerprint, runner.layout)
    writer = StoreWriter(store, lambda kind, keys: None, lambda: True, max_wait_s=0.5)
    try:
        engine = PrefillEngine(runner, store, writer, tiny_int4_f16.fingerprint)
        assert store.block_bytes == runner.layout.bytes_per_token * BLOCK
        cold = engine.prefill(PROMPT, GREEDY)
        _settle(engine)
        warm = engine.prefill(PROMPT, GREEDY)
        assert warm.cached_tokens == 5 * BLOCK and warm.kv.keys[0].dtype == np.float16
        stored = warm.kv.prefix(5 * BLOCK)
        for x, y in zip(stored.keys + stored.values, cold.kv.keys + cold.kv.values, strict=False):
            np.testing.assert_array_equal(x, y[:, :, : 5 * BLOCK])
        assert warm.first_token == cold.first_token
    finally:
        writer.close()
        store.close()


@pytest.mark.parametrize("chunk", [5, 8, 16])
def test_a_prompt_run_in_chunks_taking_turns_gives_the_one_run_prefill(make_engine: EngineFactory, chunk: int) -> None:
    """A colocated worker's prefill in chunks between decode steps: the same first token and KV,
    and every chunk ran as a turn (a last chunk of one token joins the one before it)."""
    from kvmesh.model.turns import Turns

    class Counting(Turns):
        def __init__(self) -> None:
            super().__init__()
            self.turns: list[str] = []

        def turn(self, side):  # type: ignore[no-untyped-def, override]
            self.turns.append(side)
            return super().turn(side)

    prompt = [int(t) for t in np.random.default_rng(9).integers(0, 200, 41)]
    whole, _ = make_engine(cache=False)
    turns = Counting()
    chunked, _ = make_engine(
        path=whole.store.config.path.parent / "other", cache=False, turns=turns, chunk_tokens=chunk
    )
    a, b = whole.prefill(prompt, SamplingParams()), chunked.prefill(prompt, SamplingParams())
    assert a.first_token == b.first_token
    for x, y in zip(a.kv.keys + a.kv.values, b.kv.keys + b.kv.values, strict=True):
        np.testing.assert_allclose(x, y, atol=1e-5)
    assert turns.turns == ["prefill"] * (41 // chunk if 41 % chunk == 1 else -(-41 // chunk))


def test_turns_alternate_when_both_sides_wait() -> None:
    import threading

    from kvmesh.model.turns import Turns

    turns, order = Turns(), []
    hold = threading.Event()

    def side(name: str, n: int) -> None:
        for _ in range(n):
            with turns.turn(name):  # type: ignore[arg-type]
                order.append(name)
                hold.wait(0.002)

    with turns.turn("decode"):  # both queue behind a running step
        threads = [threading.Thread(target=side, args=(s, 4)) for s in ("prefill", "decode")]
        for t in threads:
            t.start()
        while sum(turns._waiting.values()) < 2:
            hold.wait(0.001)
    for t in threads:
        t.join(10)
    assert order == ["prefill", "decode"] * 4


def _decoded_reply(engine: PrefillEngine) -> tuple[PrefillOutcome, KVCache]:
    """PROMPT's first 3 blocks stored by a prefill, then blocks 3-4 written back as a decode node
    with other numerics would (here: the exact KV + 0.5, so the two are told apart)."""
    exact = engine.prefill(PROMPT, GREEDY)
    engine.writer.submit(lambda store, events: store.drop(engine.keys(PROMPT, b"")[3], events))
    _settle(engine)
    s = slice(3 * BLOCK, 5 * BLOCK)
    made = KVCache([k[:, :, s] + 0.5 for k in exact.kv.keys], [v[:, :, s] + 0.5 for v in exact.kv.values])
    assert engine.store_kv(PROMPT[: 5 * BLOCK], b"", 3, made, decoded=True) == 2
    _settle(engine)
    return exact, made


def test_a_decode_nodes_blocks_serve_a_resumption_not_a_prompt(make_engine: EngineFactory) -> None:
    """Blocks a decode node made with other numerics (int8 activations) are where a migrated
    sequence resumes from (its KV as its decode steps made it), but a prompt's lookup stops before
    them and computes them exactly, and that exact KV takes their place in the store."""
    engine, events = make_engine()
    exact, made = _decoded_reply(engine)
    assert engine.store.cached_blocks(engine.keys(PROMPT, b"")) == 3
    assert engine.store.cached_blocks(engine.keys(PROMPT, b""), decoded=True) == 5
    resumed = engine.prefill(PROMPT, GREEDY, replay=4)  # prompt: the first 40 tokens
    assert resumed.cached_tokens == 5 * BLOCK
    np.testing.assert_array_equal(resumed.kv.keys[0][:, :, 3 * BLOCK :], made.keys[0])
    assert engine.uncached_tokens(PROMPT, b"") == len(PROMPT) - 3 * BLOCK
    again = engine.prefill(PROMPT, GREEDY)
    assert again.cached_tokens == 3 * BLOCK
    _same(again, exact)
    _settle(engine)  # its blocks 3-4, exact, replaced the decoded ones
    assert engine.store.cached_blocks(engine.keys(PROMPT, b"")) == 5
    assert engine.prefill(PROMPT, GREEDY).cached_tokens == 5 * BLOCK
    stored = [keys for kind, keys in events.log if kind == "stored"]
    assert sum(len(k) for k in stored) == 5 + 2  # the write-back announced; the replacement not again


def test_a_finished_replys_blocks_are_recomputed_exactly(make_engine: EngineFactory) -> None:
    engine, _ = make_engine()
    exact, _ = _decoded_reply(engine)
    full = PROMPT[: 5 * BLOCK]
    assert engine.recompute(full, b"", max_tokens=BLOCK) == 1  # a piece at a time
    _settle(engine)
    assert engine.recompute(full, b"", max_tokens=256) == 1
    _settle(engine)
    assert engine.recompute(full, b"", max_tokens=256) == 0  # nothing left
    warm = engine.prefill(PROMPT, GREEDY)
    assert warm.cached_tokens == 5 * BLOCK
    _same(warm, exact)
    assert engine.recompute([1] * 2 * BLOCK, b"", 256) == 0  # a chain not stored: nothing


def test_reusing_decoded_blocks_is_one_setting_away(make_engine: EngineFactory) -> None:
    engine, _ = make_engine(reuse_decoded=True)
    _, made = _decoded_reply(engine)
    hit = engine.prefill(PROMPT, GREEDY)
    assert hit.cached_tokens == 5 * BLOCK and engine.uncached_tokens(PROMPT, b"") == len(PROMPT) - 5 * BLOCK
    np.testing.assert_array_equal(hit.kv.keys[0][:, :, 3 * BLOCK : 5 * BLOCK], made.keys[0])


@pytest.mark.parametrize("chunk", [0, 5])
def test_a_prompt_prefilled_into_a_decode_slot_is_the_prefill_out_of_place(
    make_engine: EngineFactory, chunk: int
) -> None:
    """A colocated worker's prompts go straight into a lent decode slot: cold and warm (the stored
    prefix read into the slot), in one run or in chunks taking turns, the same first token and KV
    as out of place, and the new blocks stored for the next prompt."""
    from kvmesh.model.batch import SlotBatch
    from kvmesh.model.lease import LeasedKV
    from kvmesh.model.turns import Turns

    plain, _ = make_engine()
    slotted, events = make_engine(
        path=plain.store.config.path.parent / "other", turns=Turns() if chunk else None, chunk_tokens=chunk
    )
    batch = SlotBatch(slotted.runner, slots=2, capacity=64)
    longer = [*PROMPT, 7, 8, 9, 10, 11]
    for prompt, cached in ((PROMPT, 0), (longer, 5 * BLOCK)):  # cold, then warm after the first's blocks
        want = plain.prefill(prompt, GREEDY)
        lease = batch.lease()
        got = slotted.prefill(prompt, GREEDY, into=lease)
        assert isinstance(got.kv, LeasedKV) and got.kv.lease is lease and got.cached_tokens == cached
        _same(got, want)
        _settle(plain)
        _settle(slotted)
        assert lease is not None and lease.place is not None
        batch.give_back(lease.place.slot)
    assert [len(keys) for kind, keys in events.log if kind == "stored"] == [5, 1]  # the first's, then the new one
    assert not batch._lent


def test_prompts_prefilled_together_each_get_their_own_outcome(make_engine: EngineFactory) -> None:
    """Prompts run together into their decode slots get what each gets alone (first token, KV,
    cached tokens, its new blocks stored); one that is invalid fails alone; one whose request left
    before its run is not written into a slot; and every slot lent comes back to the batch."""
    from kvmesh.model.batch import SlotBatch
    from kvmesh.model.lease import LeasedKV

    plain, _ = make_engine()
    grouped, events = make_engine(path=plain.store.config.path.parent / "other")
    assert grouped.runner.load_group() and grouped.can_group
    batch = SlotBatch(grouped.runner, slots=4, capacity=64)
    other = [int(t) for t in np.random.default_rng(9).integers(0, 256, 21)]
    for prompt in (PROMPT, other):  # stored first: the run together reads their prefixes
        grouped.prefill(prompt, GREEDY)
    _settle(grouped)
    prompts = [[*PROMPT, 3, 4, 5, 6], other, [*other[:16], 1], [5, 6, 7], [1, 10**6], PROMPT]
    leases = [batch.lease() for _ in prompts]
    assert all(lease is not None for lease in leases)
    leases[-1].abandon()  # type: ignore[union-attr]  # its request left before its turn
    jobs = [Prompt(p, GREEDY, grouped.lookup_keys(p, b""), lease) for p, lease in zip(prompts, leases, strict=True)]  # type: ignore[arg-type]
    got = grouped.prefill_together(jobs)
    assert isinstance(got[4], InvalidArgument)  # a token beyond the vocabulary: its own error
    for i in (0, 1, 2, 3):
        outcome = got[i]
        assert isinstance(outcome, PrefillOutcome) and isinstance(outcome.kv, LeasedKV) and outcome.together == 4
        _same(outcome, plain.prefill(prompts[i], GREEDY))
    assert [o.cached_tokens for o in got[:4]] == [5 * BLOCK, 2 * BLOCK, 2 * BLOCK, 0]  # type: ignore[union-attr]
    assert isinstance(got[5], PrefillOutcome) and not isinstance(got[5].kv, LeasedKV)  # computed, not in a slot
    _settle(grouped)
    assert [len(keys) for kind, keys in events.log if kind == "stored"][-1:] == [1]  # the first one's 6th block
    for lease in leases[:4]:
        assert lease is not None and lease.place is not None
        batch.give_back(lease.place.slot)
    assert not batch._lent  # the invalid one's and the abandoned one's slots were never kept


def test_prompts_with_their_own_prefixes_run_together_once_the_past_buffer_holds_them(
    make_engine: EngineFactory,
) -> None:
    """Out of place, prompts run together read their stored prefixes side by side into the past
    buffer. Four prompts with prefixes of their own do not fit the buffer grown for one: they run
    in several runs, and the writer grows it, so the next four run in one. Every KV is the one the
    prompt gets alone (bit for bit where 2+ tokens are computed)."""
    plain, _ = make_engine()
    grouped, _ = make_engine(path=plain.store.config.path.parent / "other")
    assert grouped.runner.load_group()
    prompts = [[int(t) for t in np.random.default_rng(20 + i).integers(0, 256, 42)] for i in range(4)]
    for prompt in prompts:
        grouped.prefill(prompt, GREEDY)
    _settle(grouped)
    for round_ in range(2):
        tails = [[*p, 1 + round_, 2, 3] for p in prompts]  # 40 tokens stored each, 5 computed
        got = grouped.prefill_together([Prompt(t, GREEDY, grouped.lookup_keys(t, b"")) for t in tails])
        assert all(isinstance(o, PrefillOutcome) and o.cached_tokens == 40 for o in got)
        for outcome, tail in zip(got, tails, strict=True):
            assert isinstance(outcome, PrefillOutcome)
            want = plain.prefill(tail, GREEDY)
            assert outcome.first_token == want.first_token
            for a, b in zip(outcome.kv.keys + outcome.kv.values, want.kv.keys + want.kv.values, strict=True):
                np.testing.assert_array_equal(a, b)
        together = [o.together for o in got]  # type: ignore[union-attr]
        # first in more than one run (the writer may grow the buffer while they run), then in one
        assert max(together) < 4 if round_ == 0 else together == [4, 4, 4, 4], together
        _settle(grouped)  # the writer grew the past buffer meanwhile
