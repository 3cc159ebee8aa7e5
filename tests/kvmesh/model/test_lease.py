"""A decode slot lent to a prefill: the model run in place equals the run out of place bit for bit,
the slot joins where it lies (or moves when a sequence left meanwhile), and it goes back exactly
once however the request ends."""

import numpy as np
import pytest

from kvmesh.errors import ResourceExhausted
from kvmesh.model.batch import SlotBatch, decode_loop
from kvmesh.model.folder import ModelFolder
from kvmesh.model.lease import Place, SlotLease
from kvmesh.model.runner import ModelRunner, RunnerConfig

PROMPT = [int(t) for t in np.random.default_rng(5).integers(0, 256, 40)]


def _same(place: Place, kv_keys: list[np.ndarray], kv_values: list[np.ndarray], tokens: int) -> None:
    held = place.kv(tokens)
    for a, b in zip(held.keys + held.values, kv_keys + kv_values, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("variant", ["fp32", "int4"])
@pytest.mark.parametrize("past", [0, 1, 33, 39])
def test_prefill_in_place_equals_prefill(variant: str, past: int, request: pytest.FixtureRequest) -> None:
    folder: ModelFolder = request.getfixturevalue(f"tiny_{variant}")
    runner = ModelRunner(folder, RunnerConfig(threads=1))
    batch = SlotBatch(runner, slots=3, capacity=64)
    lease = batch.lease()
    assert lease is not None
    place = lease.take()
    assert place is not None and place.slot == 0
    want_logits, want = runner.prefill(PROMPT)
    if past:  # the past as a prefill finds it in the slot (read from the store), and the run after it
        _, before = runner.prefill(PROMPT[:past])
        held = [a for pair in zip(before.keys, before.values, strict=True) for a in pair]
        for buf, src in zip(place.buffers, held, strict=True):
            buf[:, :, :past] = src
        want_logits, want = runner.prefill(PROMPT[past:], before)
    logits = runner.prefill_in_place(PROMPT[past:], place.buffers, past)
    np.testing.assert_array_equal(logits, want_logits)
    _same(place, want.keys, want.values, len(PROMPT))
    assert not np.any(place.blocks[:, :, :, len(PROMPT) :])  # nothing written beyond the prompt


def test_a_joined_slot_decodes_as_a_copied_one(tiny_int4: ModelFolder) -> None:
    runner = ModelRunner(tiny_int4, RunnerConfig(threads=1))
    logits, kv = runner.prefill(PROMPT)
    alone, toks = decode_loop(runner, kv, 64), [int(np.argmax(logits))]
    for _ in range(8):
        toks.append(int(np.argmax(alone.step(toks[-1]))))
    batch = SlotBatch(runner, slots=2, capacity=64)
    batch.add(runner.prefill(PROMPT[:7])[1])  # a sequence running in slot 0
    lease = batch.lease()
    assert lease is not None
    place = lease.take()
    assert place is not None
    first = runner.prefill_in_place(PROMPT, place.buffers, 0)
    lease.written(ok=True)
    assert lease.hand_over() is place
    assert batch.join(place.slot, len(PROMPT)) == 1
    got = [int(np.argmax(first))]
    for _ in range(8):
        got.append(int(np.argmax(batch.step(np.array([0, got[-1]]))[1])))
    assert got == toks


def test_lent_slots_join_where_they_lie_or_move_down(tiny_fp32: ModelFolder) -> None:
    runner = ModelRunner(tiny_fp32, RunnerConfig(threads=1))
    batch = SlotBatch(runner, slots=4, capacity=64)
    _, kv = runner.prefill(PROMPT)
    batch.add(kv.prefix(5))
    batch.add(kv.prefix(6))  # slots 0 and 1 run
    a, b = batch.lease(), batch.lease()
    assert a is not None and b is not None
    pa, pb = a.take(), b.take()
    assert pa is not None and pb is not None and (pa.slot, pb.slot) == (2, 3)
    assert not batch.can_add  # the next slot is lent: a copied KV waits
    with pytest.raises(ResourceExhausted):
        batch.add(kv)
    assert batch.lease() is not None and batch.lease().take() is None  # type: ignore[union-attr]  # none free
    runner.prefill_in_place(PROMPT, pa.buffers, 0)
    runner.prefill_in_place(PROMPT[:30], pb.buffers, 0)
    assert batch.join(pb.slot, 30) is None  # slot 2, lent, is still being written
    batch.remove(0)  # a sequence leaves: slot 1's moves to 0, slot 2 is no longer the next
    assert batch.join(pa.slot, len(PROMPT)) == 1  # moved down a slot
    assert batch.join(pb.slot, 30) == 2
    _same(batch.kv.place(1), kv.keys, kv.values, len(PROMPT))
    assert list(batch.lengths[:3]) == [6, len(PROMPT), 30] and batch.active == 3 and batch.can_add


def test_a_lease_goes_back_once_however_the_request_ends(tiny_fp32: ModelFolder) -> None:
    """On a one-slot batch: after each ending the slot is free again, and a lease that gave it
    back never frees it a second time under the next one that holds it."""
    batch = SlotBatch(ModelRunner(tiny_fp32, RunnerConfig(threads=1)), slots=1, capacity=64)

    def lease() -> SlotLease:
        got = batch.lease()
        assert got is not None
        return got

    gone = lease()  # the request left before its prefill ran: nothing lent
    gone.abandon()
    assert gone.take() is None and not batch._lent

    writing = lease()  # left while the prefill writes: back once the prefill ends
    assert writing.take() is not None
    writing.abandon()
    assert batch._lent == {0}
    writing.written(ok=True)
    assert not batch._lent

    failed = lease()  # the prefill failed: back at once, and not again when the request leaves
    failed.take()
    failed.written(ok=False)
    holder = lease()
    assert holder.take() is not None
    failed.abandon()
    assert batch._lent == {0}  # still the holder's
    holder.written(ok=True)
    holder.abandon()  # prefilled, then the request left before joining (its first token ended it)
    assert not batch._lent

    joined = lease()  # handed to the batcher: it gives the slot back itself, the request cannot
    place = joined.take()
    joined.written(ok=True)
    assert place is not None and joined.hand_over() is place
    joined.abandon()
    assert batch._lent == {0}
    assert batch.join(place.slot, 3) == 0 and not batch._lent and batch.active == 1


@pytest.mark.parametrize("variant", ["fp32", "int4"])
def test_prompts_prefilled_together_equal_each_alone(variant: str, request: pytest.FixtureRequest) -> None:
    """The group graph runs several slots' prefills at once: each slot's KV is what its prefill in
    place alone makes, whatever its past (none, 1, many): bit for bit where it computes 2 tokens or
    more (alone, one token takes MatMulNBits' one-row kernel: the last bits differ). Its logits agree
    but for the last bits (the output projection runs over several rows)."""
    folder: ModelFolder = request.getfixturevalue(f"tiny_{variant}")
    runner = ModelRunner(folder, RunnerConfig(threads=1))
    assert runner.load_group() and runner.group_segments == 8
    pasts, news = [0, 1, 33, 20, 39], [40, 5, 7, 1, 1]
    sizes = [p + n for p, n in zip(pasts, news, strict=True)]
    prompts = [[int(t) for t in np.random.default_rng(i).integers(0, 256, n)] for i, n in enumerate(sizes)]
    alone, together = SlotBatch(runner, slots=5, capacity=64), SlotBatch(runner, slots=5, capacity=64)
    want = []
    for slot, (prompt, past) in enumerate(zip(prompts, pasts, strict=True)):
        for batch in (alone, together):
            if past:
                runner.prefill_in_place(prompt[:past], batch.kv.place(slot).buffers, 0)
        want.append(runner.prefill_in_place(prompt[past:], alone.kv.place(slot).buffers, past))
    rows = [(p[past:], together.kv.place(s).buffers, past) for s, (p, past) in enumerate(zip(prompts, pasts))]  # noqa: B905
    got = runner.prefill_group_in_place(rows[:3])  # fewer rows than segments, then the rest
    got = np.concatenate([got, runner.prefill_group_in_place(rows[3:])])
    for slot, prompt in enumerate(prompts):
        np.testing.assert_allclose(got[slot], want[slot], rtol=0, atol=1e-4)
        assert int(np.argmax(got[slot])) == int(np.argmax(want[slot]))
        held, made = alone.kv.place(slot).kv(len(prompt)), together.kv.place(slot).kv(len(prompt))
        for a, b in zip(made.keys + made.values, held.keys + held.values, strict=True):
            if news[slot] > 1 or variant == "fp32":
                np.testing.assert_array_equal(a, b)
            else:
                np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    assert not np.any(together.kv._all[:, :, :, max(map(len, prompts)) :])  # nothing beyond the prompts
