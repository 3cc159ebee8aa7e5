"""SmolLM2-135M-Instruct, converted from its GGUF by kvmesh: answers, split equivalence at block
boundaries, int4 quality against fp32, and the same greedy tokens as ONNX Runtime GenAI."""

from pathlib import Path

import numpy as np
import onnxruntime_genai as og
import pytest

from kvmesh.generate import Finished, generate
from kvmesh.model.folder import ModelFolder
from kvmesh.model.kv import KVCache
from kvmesh.model.runner import ModelRunner, RunnerConfig
from kvmesh.model.tokenizer import ChatTokenizer, chat_messages
from kvmesh.sampling import SamplingParams, log_softmax

TEXT = (Path(__file__).parents[2] / "data" / "english.txt").read_text()


def _answer(folder: ModelFolder, question: str) -> Finished:
    tok = ChatTokenizer(folder)
    runner = ModelRunner(folder, RunnerConfig(threads=2))
    *_, done = generate(runner, tok, tok.encode_chat(chat_messages(question)), SamplingParams(max_tokens=40))
    assert isinstance(done, Finished)
    return done


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_capital_of_france_is_paris(precision: str, request: pytest.FixtureRequest) -> None:
    done = _answer(request.getfixturevalue(f"real_{precision}"), "What is the capital of France?")
    assert "Paris" in done.text


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_splits_at_block_boundaries_equal_the_full_prefill(precision: str, request: pytest.FixtureRequest) -> None:
    folder: ModelFolder = request.getfixturevalue(f"real_{precision}")
    tok = ChatTokenizer(folder)
    ids = tok.encode(TEXT)[:300]
    runner = ModelRunner(folder, RunnerConfig(threads=2, all_logits=True))
    full_logits, full_kv = runner.forward(np.array([ids]), KVCache.empty(runner.layout))
    for k in (1, 15, 16, 17, 64, 128, 256, 299):
        _, head = runner.forward(np.array([ids[:k]]), KVCache.empty(runner.layout))
        logits, kv = runner.forward(np.array([ids[k:]]), head)
        # fp32 sums in another order across the split; logits are O(10), so 1e-3 is ~1e-4 relative.
        np.testing.assert_allclose(logits[0], full_logits[0, k:], atol=1e-3, err_msg=f"split at {k}")
        assert (logits[0].argmax(-1) == full_logits[0, k:].argmax(-1)).all()
        for a, b in zip(kv.keys + kv.values, full_kv.keys + full_kv.values, strict=True):
            np.testing.assert_allclose(a, b, atol=1e-4, err_msg=f"split at {k}")


def test_int4_keeps_the_quality_of_fp32(real_fp32: ModelFolder, real_int4: ModelFolder) -> None:
    ids = np.array([ChatTokenizer(real_fp32).encode(TEXT)])
    assert ids.shape[1] >= 500
    logits = {}
    for name, folder in (("fp32", real_fp32), ("int4", real_int4)):
        runner = ModelRunner(folder, RunnerConfig(threads=2, all_logits=True))
        logits[name] = runner.forward(ids, KVCache.empty(runner.layout))[0][0]
    agreement = float((logits["int4"].argmax(-1) == logits["fp32"].argmax(-1)).mean())
    p = np.stack([log_softmax(row) for row in logits["fp32"]])
    q = np.stack([log_softmax(row) for row in logits["int4"]])
    kl = float((np.exp(p) * (p - q)).sum(-1).mean())
    print(f"\nint4 vs fp32 over {ids.shape[1]} positions: top-1 agreement {agreement:.4f}, mean KL {kl:.2e}")
    assert agreement >= 0.95


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_onnxruntime_genai_loads_the_folder_and_agrees(precision: str, request: pytest.FixtureRequest) -> None:
    folder: ModelFolder = request.getfixturevalue(f"real_{precision}")
    tok = ChatTokenizer(folder)
    prompt = tok.encode_chat(chat_messages("Name three colours of the rainbow."))
    ours = _greedy(folder, prompt, 24)
    model = og.Model(str(folder.path))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + 24, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt)
    theirs: list[int] = []
    while not gen.is_done():
        gen.generate_next_token()
        theirs.append(int(gen.get_next_tokens()[0]))
    assert theirs[: len(ours)] == ours


def _greedy(folder: ModelFolder, prompt: list[int], n: int) -> list[int]:
    """GenAI runs model.onnx, the exact graph: so do our decode steps here (not model_decode.onnx)."""
    tok = ChatTokenizer(folder)
    runner = ModelRunner(folder, RunnerConfig(decode_numerics="exact"))
    *_, done = generate(runner, tok, prompt, SamplingParams(max_tokens=n))
    assert isinstance(done, Finished)
    return done.token_ids
