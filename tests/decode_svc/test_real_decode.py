"""SmolLM2 int4 through a prefill node and a decode node equals one-process generate."""

from pathlib import Path

from kvmesh.generate import Finished, generate
from kvmesh.model.folder import ModelFolder
from kvmesh.model.runner import ModelRunner, RunnerConfig
from kvmesh.model.tokenizer import ChatTokenizer, chat_messages
from kvmesh.sampling import SamplingParams
from tests.decode_svc.test_decode import _decode
from tests.helpers.servers import MakeServer


def test_real_model_disaggregated_equals_one_process(
    real_int4: ModelFolder, servers: MakeServer, tmp_path: Path
) -> None:
    tok = ChatTokenizer(real_int4)
    p = servers("prefill", real_int4, block_size=16, threads=2)
    d = servers("decode", real_int4, slot_tokens=512, threads=2)
    for question in ("What is the capital of France?", "Name three colours of the rainbow."):
        prompt = tok.encode_chat(chat_messages(question))
        *_, done = generate(ModelRunner(real_int4, RunnerConfig(threads=2)), tok, prompt, SamplingParams(max_tokens=32))
        assert isinstance(done, Finished)
        tokens, finished = _decode(d.address, prompt, p.address, max_tokens=32)
        assert tokens == done.token_ids
        assert finished.finish_reason == done.reason
    assert "Paris" in tok.decode(
        _decode(d.address, tok.encode_chat(chat_messages("What is the capital of France?")), p.address)[0]
    )
