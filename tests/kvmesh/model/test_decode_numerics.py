"""The default decode numerics on SmolLM2 (int8 activations in decode steps, prefill exact): their
quality against the exact fp32 model, and batch invariance (a sequence's logits do not depend on
its batch mates or its slot), greedy and seeded. Where the CPU lacks AVX-512 VNNI the default
("auto") decodes exactly, and the int8 steps' invariance is asserted only where they run."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from decode_svc.batcher import Batcher, Sequence
from kvmesh.model.batch import SlotBatch, decode_loop
from kvmesh.model.folder import ModelFolder
from kvmesh.model.kv import KVCache
from kvmesh.model.runner import INT8_DECODE_FLAGS, ModelRunner, RunnerConfig, cpu_flags
from kvmesh.model.tokenizer import ChatTokenizer
from kvmesh.sampling import Sampler, SamplingParams, log_softmax

TEXT = (Path(__file__).parents[2] / "data" / "english.txt").read_text()
INT8_HERE = cpu_flags() >= INT8_DECODE_FLAGS
int8_steps_run_here = pytest.mark.skipif(
    not INT8_HERE, reason="no AVX-512 VNNI: decode steps run exact (fp32 activations) on this CPU by default"
)


def test_default_folder_decodes_with_int8_activations_and_prefills_exactly(real_int4: ModelFolder) -> None:
    runner = ModelRunner(real_int4, RunnerConfig(threads=2, decode_numerics="int8"))
    assert real_int4.decode_graph is not None
    assert runner.decode_session is not runner.session
    assert runner.decode_numerics.startswith("int8 activations")
    default = ModelRunner(real_int4, RunnerConfig(threads=2))
    assert (default.decode_session is not default.session) == INT8_HERE
    assert real_int4.meta["accuracy_level"] == 0  # prefill, the first token and every KV byte: exact
    exact = ModelRunner(real_int4, RunnerConfig(threads=2, decode_numerics="exact"))
    assert exact.decode_session is exact.session and exact.decode_numerics == "exact (fp32 activations)"


def test_teacher_forced_decode_steps_keep_the_quality_of_the_exact_model(
    real_int4: ModelFolder, real_fp32: ModelFolder
) -> None:
    """Each position of a >= 500-token English text predicted by a decode step (the text's own
    previous token fed in) with the default numerics, against the fp32 model's logits over the
    whole text."""
    ids = ChatTokenizer(real_fp32).encode(TEXT)
    assert len(ids) >= 500
    ref = ModelRunner(real_fp32, RunnerConfig(threads=2, all_logits=True))
    exact = ref.forward(np.array([ids]), KVCache.empty(ref.layout))[0][0]
    runner = ModelRunner(real_int4, RunnerConfig(threads=2))
    first, kv = runner.prefill(ids[:1])
    decoder = decode_loop(runner, kv, len(ids) + 1)
    ours = np.stack([first, *(decoder.step(t) for t in ids[1:])])
    agreement = float((ours.argmax(-1) == exact.argmax(-1)).mean())
    p = np.stack([log_softmax(row) for row in exact])
    q = np.stack([log_softmax(row) for row in ours])
    kl = float((np.exp(p) * (p - q)).sum(-1).mean())
    print(
        f"\n{runner.decode_numerics} decode vs fp32 over {len(ids)} positions: "
        f"top-1 agreement {agreement:.4f}, mean KL {kl:.2e}"
    )
    assert agreement >= 0.97
    assert kl <= 3e-3


def _prompts(tok: ChatTokenizer, n: int) -> list[list[int]]:
    ids = tok.encode(TEXT)
    return [ids[7 * i : 7 * i + 20 + 9 * i] for i in range(n)]  # 20 .. 155 tokens: every row its own length


def _greedy_rows(
    runner: ModelRunner, pre: list[tuple[np.ndarray, KVCache]], members: list[int], slots: int
) -> dict[int, np.ndarray]:
    """Sequences `members` decoded together (in slots 0.., in that order): each one's 12 steps' logits."""
    batch = SlotBatch(runner, slots, 256)
    last = {}
    for m in members:
        batch.add(pre[m][1])
        last[m] = int(np.argmax(pre[m][0]))
    rows: dict[int, list[np.ndarray]] = {m: [] for m in members}
    for _ in range(12):
        logits = batch.step(np.array([last[m] for m in members]))
        for m, row in zip(members, logits, strict=True):
            rows[m].append(row.copy())
            last[m] = int(np.argmax(row))
    return {m: np.stack(r) for m, r in rows.items()}


@int8_steps_run_here
def test_batch_mates_and_slots_do_not_change_a_sequences_logits(real_int4: ModelFolder) -> None:
    """Batch sizes 1..16, each sequence in another slot than alone: bit-identical logits (int8
    activations are quantized per row, so a row's numbers never see its mates')."""
    runner = ModelRunner(real_int4, RunnerConfig(threads=2))
    pre = [runner.prefill(p) for p in _prompts(ChatTokenizer(real_int4), 16)]
    alone = {m: _greedy_rows(runner, pre, [m], 1)[m] for m in range(16)}
    for size in range(1, 17):
        members = list(range(16 - size, 16))[::-1]  # sequence 15 in slot 0, 14 in slot 1, ...
        together = _greedy_rows(runner, pre, members, 16)
        for m in members:
            np.testing.assert_array_equal(together[m], alone[m], err_msg=f"sequence {m} in a batch of {size}")


def _batcher_tokens(runner: ModelRunner, jobs: list[tuple[list[int], SamplingParams]]) -> list[list[int]]:
    """Every job through one decode Batcher at once (the decode node's loop): each one's tokens."""
    got: list[list[int]] = [[] for _ in jobs]
    done = [threading.Event() for _ in jobs]
    batcher = Batcher(runner, len(jobs), 256, lambda *_: None)
    try:
        for i, (prompt, params) in enumerate(jobs):
            logits, kv = runner.prefill(prompt)
            sampler = Sampler(params)
            first, _ = sampler.sample(logits)
            got[i].append(first)

            def emit(ev: tuple[int, float] | tuple[str, str], i: int = i) -> None:
                if isinstance(ev[0], str):
                    done[i].set()
                else:
                    got[i].append(int(ev[0]))

            batcher.submit(Sequence(f"r{i}", first, sampler, params.max_tokens - 1, (), emit), kv)
        assert all(e.wait(120) for e in done)
    finally:
        batcher.close()
    return got


@int8_steps_run_here
def test_seeded_sampling_is_reproducible_whatever_the_batch_mates(real_int4: ModelFolder) -> None:
    runner = ModelRunner(real_int4, RunnerConfig(threads=2))
    prompts = _prompts(ChatTokenizer(real_int4), 6)
    seeded = SamplingParams(temperature=0.9, top_p=0.95, seed=7, max_tokens=24)
    alone = _batcher_tokens(runner, [(prompts[0], seeded)])[0]
    mates = [
        (prompts[1], SamplingParams(max_tokens=24)),
        (prompts[2], SamplingParams(temperature=1.2, seed=3, max_tokens=10)),
        (prompts[3], SamplingParams(temperature=0.7, top_k=40, seed=11, max_tokens=24)),
        (prompts[4], SamplingParams(max_tokens=5)),
    ]
    together = _batcher_tokens(runner, [*mates[:2], (prompts[0], seeded), *mates[2:]])
    assert together[2] == alone
    assert len(alone) == 24
