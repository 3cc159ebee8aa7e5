import pytest

from kvmesh.errors import InvalidArgument
from kvmesh.generate import Delta, Finished, generate
from kvmesh.model.folder import ModelFolder
from kvmesh.model.runner import ModelRunner, RunnerConfig
from kvmesh.model.tokenizer import ChatTokenizer, chat_messages
from kvmesh.sampling import SamplingParams


def _run(folder: ModelFolder, params: SamplingParams, prompt: str = "hello") -> tuple[list[Delta], Finished]:
    tok = ChatTokenizer(folder)
    events = list(
        generate(ModelRunner(folder, RunnerConfig(threads=1)), tok, tok.encode_chat(chat_messages(prompt)), params)
    )
    done = events[-1]
    assert isinstance(done, Finished)
    return [e for e in events if isinstance(e, Delta)], done


def test_greedy_is_deterministic_and_streams_the_whole_text(tiny_fp32: ModelFolder) -> None:
    deltas, done = _run(tiny_fp32, SamplingParams(max_tokens=12))
    assert "".join(d.text for d in deltas) == done.text
    assert done.reason in ("length", "eos") and len(done.token_ids) <= 12
    assert _run(tiny_fp32, SamplingParams(max_tokens=12))[1].token_ids == done.token_ids


def test_seeded_sampling_is_reproducible(tiny_fp32: ModelFolder) -> None:
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=3, max_tokens=10)
    assert _run(tiny_fp32, params)[1].token_ids == _run(tiny_fp32, params)[1].token_ids


def test_stop_string_ends_the_text_before_it(tiny_fp32: ModelFolder) -> None:
    full = _run(tiny_fp32, SamplingParams(max_tokens=20))[1].text
    stop = full[5:7]
    assert stop and stop in full
    deltas, done = _run(tiny_fp32, SamplingParams(max_tokens=20, stop=(stop,)))
    assert done.reason == "stop"
    assert done.text == full[: full.index(stop)]
    assert "".join(d.text for d in deltas) == done.text


def test_prompt_longer_than_the_context_is_refused(tiny_fp32: ModelFolder) -> None:
    tok = ChatTokenizer(tiny_fp32)
    runner = ModelRunner(tiny_fp32, RunnerConfig(threads=1))
    with pytest.raises(InvalidArgument, match="context"):
        next(generate(runner, tok, [65] * 300, SamplingParams()))
    with pytest.raises(InvalidArgument, match="empty"):
        next(generate(runner, tok, [], SamplingParams()))


def test_generation_stops_at_the_context_end(tiny_fp32: ModelFolder) -> None:
    tok = ChatTokenizer(tiny_fp32)
    runner = ModelRunner(tiny_fp32, RunnerConfig(threads=1))
    events = list(generate(runner, tok, [65] * 250, SamplingParams(max_tokens=100)))
    done = events[-1]
    assert isinstance(done, Finished)
    assert done.reason in ("length", "eos") and len(done.token_ids) <= 6
