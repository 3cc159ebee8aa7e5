"""SmolLM2: a warm prefill (prefix from the store) equals a full prefill."""

from pathlib import Path

import numpy as np
import pytest

from kvmesh.model.folder import ModelFolder
from kvmesh.model.runner import ModelRunner, RunnerConfig
from kvmesh.model.tokenizer import ChatTokenizer
from kvmesh.sampling import SamplingParams, log_softmax
from prefill_svc.engine import PrefillEngine
from prefill_svc.store import PrefixStore, StoreConfig, StoreWriter

TEXT = (Path(__file__).parents[1] / "data" / "english.txt").read_text()


@pytest.mark.parametrize(("precision", "atol"), [("fp32", 1e-4), ("int4", 1e-3)])
def test_warm_prefill_equals_full_prefill(
    precision: str, atol: float, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    folder: ModelFolder = request.getfixturevalue(f"real_{precision}")
    runner = ModelRunner(folder, RunnerConfig(threads=2))
    store = PrefixStore(StoreConfig(tmp_path / "store"), folder.fingerprint, runner.layout)
    writer = StoreWriter(store, lambda *_: None)
    engine = PrefillEngine(runner, store, writer, folder.fingerprint)
    system = ChatTokenizer(folder).encode(TEXT)[:250]
    cold = engine.prefill([*system, 11, 12, 13], SamplingParams())
    writer.flush()
    for tail in ([11, 12, 13], [11, 12, 13, 14, 15], [99]):  # the same prompt, and other turns after it
        prompt = [*system, *tail]
        warm = engine.prefill(prompt, SamplingParams())
        full = engine.runner.prefill(prompt)
        assert warm.cached_tokens == 240  # 15 blocks of 16
        assert warm.first_token == int(np.argmax(full[0]))
        assert warm.first_logprob == pytest.approx(log_softmax(full[0])[warm.first_token], abs=atol)
        for a, b in zip(warm.kv.keys + warm.kv.values, full[1].keys + full[1].values, strict=True):
            np.testing.assert_allclose(a, b, atol=atol)
    assert cold.cached_tokens == 0
    writer.close()
    store.close()
