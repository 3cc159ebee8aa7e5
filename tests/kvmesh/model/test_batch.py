"""Batched decode over KV slots gives each sequence what it gets alone, as sequences come and go."""

from pathlib import Path

import numpy as np
import onnx
import pytest

from kvmesh.errors import ResourceExhausted
from kvmesh.model.batch import SlotBatch, decode_loop
from kvmesh.model.folder import ModelFolder
from kvmesh.model.runner import ModelRunner, RunnerConfig, cpu_flags

PROMPTS = [
    [int(t) for t in np.random.default_rng(s).integers(0, 256, n)] for s, n in ((1, 5), (2, 40), (3, 17), (4, 60))
]


@pytest.mark.parametrize(
    ("variant", "on_device"),
    [("fp32", False), ("int4", False), ("int4_dec4", False), ("int4_f16", False), ("fp32", True), ("int4_f16", True)],
)
def test_mixed_lengths_joining_and_leaving_match_single_runs(
    variant: str, on_device: bool, request: pytest.FixtureRequest
) -> None:
    """on_device: the slots as a CUDA session keeps them (ORT allocations bound by address, copies
    through the Identity graph), here on host memory."""
    folder: ModelFolder = request.getfixturevalue(f"tiny_{variant}")
    runner = ModelRunner(folder, RunnerConfig(threads=1))
    if runner.device != "cpu" and not on_device:
        pytest.skip("a CUDA session keeps its slots on the device")
    alone = []
    for p in PROMPTS:  # each sequence alone: 12 greedy tokens
        logits, kv = runner.prefill(p)
        dec, toks = decode_loop(runner, kv, len(p) + 13), [int(np.argmax(logits))]
        for _ in range(12):
            toks.append(int(np.argmax(dec.step(toks[-1]))))
        alone.append(toks)
    batch = SlotBatch(runner, slots=3, capacity=100, on_device=on_device)
    got: dict[int, list[int]] = {}
    slot_of: dict[int, int] = {}  # sequence -> slot
    waiting = list(range(len(PROMPTS)))

    def join() -> None:
        while waiting and batch.active < batch.slots:
            s = waiting.pop(0)
            logits, kv = runner.prefill(PROMPTS[s])
            slot_of[s], got[s] = batch.add(kv), [int(np.argmax(logits))]
            held = batch.read(slot_of[s])
            for a, b in zip(held.keys + held.values, kv.keys + kv.values, strict=True):
                np.testing.assert_array_equal(a, b)

    join()
    while slot_of:
        order = sorted(slot_of, key=slot_of.get)  # type: ignore[arg-type]
        logits = batch.step(np.array([got[s][-1] for s in order]))
        for s, row in zip(order, logits, strict=True):
            got[s].append(int(np.argmax(row)))
        for s in [s for s in order if len(got[s]) == 13]:  # done: leave, the last slot moves in
            freed = slot_of.pop(s)
            moved = batch.remove(freed)
            if moved is not None:
                mover = next(m for m, sl in slot_of.items() if sl == moved)
                slot_of[mover] = freed
        join()
    assert [got[s] for s in range(len(PROMPTS))] == alone


def test_slots_and_capacity_are_bounded(tiny_fp32: ModelFolder) -> None:
    runner = ModelRunner(tiny_fp32, RunnerConfig(threads=1))
    batch = SlotBatch(runner, slots=1, capacity=8)
    _, kv = runner.prefill([1, 2, 3, 4, 5, 6, 7])
    batch.add(kv)
    with pytest.raises(ResourceExhausted):
        batch.add(kv)
    batch.step(np.array([1]))
    with pytest.raises(ResourceExhausted):
        batch.step(np.array([1]))


def test_decode_graph_is_used_for_decode_steps_only(tiny_int4_dec4: ModelFolder) -> None:
    assert tiny_int4_dec4.decode_graph is not None
    runner = ModelRunner(tiny_int4_dec4, RunnerConfig(threads=1, decode_numerics="int8"))
    assert runner.decode_session is not runner.session
    exact = ModelRunner(tiny_int4_dec4, RunnerConfig(threads=1, decode_numerics="exact"))
    assert exact.decode_session is exact.session
    np.testing.assert_array_equal(runner.prefill(PROMPTS[1])[0], exact.prefill(PROMPTS[1])[0])  # prefill: same graph
    # Decode steps: int8 activations, the 8-bit head in one MatMulNBits; close to the exact run.
    bits = {a.i for n in onnx.load(tiny_int4_dec4.decode_graph).graph.node for a in n.attribute if a.name == "bits"}
    assert bits == {4, 8}
    logits, kv = exact.prefill(PROMPTS[1])
    fast, slow = decode_loop(runner, kv, 50), decode_loop(exact, kv, 50)
    token = int(np.argmax(logits))
    for _ in range(5):
        a, b = fast.step(token), slow.step(token)
        assert np.abs(a - b).max() <= 0.03 * np.abs(b).max()  # measured: ~1.5%
        token = int(np.argmax(b))


def _resident_bytes() -> int:
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_slot_memory_is_resident_and_zero_from_the_start() -> None:
    """Host slots are faulted in when made, so neither a join's copy nor a step's new token meets
    a fresh page (first touches cost ~0.1-1 GB/s on this kind of machine)."""
    from kvmesh.model.batch import prefaulted

    before = _resident_bytes()
    a = prefaulted((4, 3, 4096, 256), np.dtype(np.float32))  # 48 MiB
    grew = _resident_bytes() - before
    assert grew >= 0.9 * a.nbytes
    assert a.shape == (4, 3, 4096, 256) and not a.any()
    a[3, 2, -1, -1] = 1.5
    assert a.sum() == 1.5


def test_auto_decode_numerics_run_int8_only_where_the_cpu_has_vnni(tiny_int4_dec4: ModelFolder) -> None:
    """Without AVX-512 VNNI, ONNX Runtime's int8-activation steps were measured neither batch-
    invariant nor within the quality floor: "auto" decodes exactly there, and says why."""
    with_vnni = ModelRunner(tiny_int4_dec4, RunnerConfig(threads=1, cpu_flags=frozenset({"avx2", "avx512_vnni"})))
    assert with_vnni.decode_session is not with_vnni.session and with_vnni.why_exact_decode == ""
    assert with_vnni.decode_numerics.startswith("int8 activations")
    avx2 = ModelRunner(tiny_int4_dec4, RunnerConfig(threads=1, cpu_flags=frozenset({"avx2", "fma"})))
    assert avx2.decode_session is avx2.session and avx2.decode_numerics == avx2.prefill_numerics
    assert "no avx512_vnni" in avx2.why_exact_decode
    forced = ModelRunner(tiny_int4_dec4, RunnerConfig(threads=1, decode_numerics="int8", cpu_flags=frozenset()))
    assert forced.decode_session is not forced.session
    if Path("/proc/cpuinfo").exists():
        assert {"fpu"} <= cpu_flags() or {"fp"} <= cpu_flags()  # x86 and arm64 name it so
