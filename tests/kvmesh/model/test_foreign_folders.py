"""Decoders kvmesh did not build: the tiny seeded model exported by Optimum (plain ONNX ops,
position_ids) and by ONNX Runtime GenAI's builder (GroupQueryAttention, symbolic head_dim) run in
kvmesh's runner and match the numpy reference of the same weights. Fixtures: tests/data/foreign."""

from pathlib import Path

import numpy as np
import pytest

from kvmesh.generate import Finished, generate
from kvmesh.model.batch import ConcatDecoder, SharedBufferDecoder, decode_loop
from kvmesh.model.folder import ModelFolder
from kvmesh.model.kv import KVCache
from kvmesh.model.reference import ReferenceLlama
from kvmesh.model.runner import ModelRunner, RunnerConfig
from kvmesh.model.tokenizer import ChatTokenizer, chat_messages
from kvmesh.sampling import SamplingParams

FOREIGN = Path(__file__).parents[2] / "data" / "foreign"
IDS = [258, 72, 101, 108, 108, 111, 260, 44, 32, 119, 111, 114]


@pytest.mark.parametrize(("exporter", "decoder"), [("optimum", ConcatDecoder), ("genai", SharedBufferDecoder)])
def test_foreign_decoder_matches_reference(exporter: str, decoder: type, tiny_gguf_f32: Path) -> None:
    folder = ModelFolder.load(FOREIGN / exporter)
    assert folder.chat_template and folder.eos_token_ids == (258,)
    runner = ModelRunner(folder, RunnerConfig(threads=1, all_logits=True))
    assert (runner.layout.layers, runner.layout.kv_heads, runner.layout.head_dim) == (2, 2, 16)
    ref = ReferenceLlama(tiny_gguf_f32)
    ref_logits, ref_kv = ref.forward(IDS)
    _, head = runner.forward(np.array([IDS[:5]]), KVCache.empty(runner.layout))  # prefill with past
    logits, kv = runner.forward(np.array([IDS[5:]]), head)
    # On CUDA (the Optimum export has no GroupQueryAttention, so it runs there) float32 matmuls
    # round through TF32, ORT's CUDA default: measured 2.7e-3 on an H100.
    tol = 1e-4 if runner.device == "cpu" else 1e-2
    np.testing.assert_allclose(logits[0], ref_logits[5:], atol=tol)
    steps = decode_loop(runner, kv, len(IDS) + 2)
    assert isinstance(steps, decoder)
    np.testing.assert_allclose(steps.step(7), ref.forward([7], ref_kv)[0][0], atol=tol)


@pytest.mark.parametrize("exporter", ["optimum", "genai"])
def test_foreign_folder_generates_like_ours(exporter: str, tiny_fp32: ModelFolder) -> None:
    def run(folder: ModelFolder) -> list[int]:
        tok = ChatTokenizer(folder)
        prompt = tok.encode_chat(chat_messages("hello there"))
        *_, done = generate(ModelRunner(folder, RunnerConfig(threads=1)), tok, prompt, SamplingParams(max_tokens=10))
        assert isinstance(done, Finished)
        return done.token_ids

    assert run(ModelFolder.load(FOREIGN / exporter)) == run(tiny_fp32)
