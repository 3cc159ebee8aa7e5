import pytest

from kvmesh.errors import InvalidArgument
from kvmesh.model.folder import ModelFolder
from kvmesh.model.tokenizer import ChatTokenizer, StreamDecoder, chat_messages

TEXT = "Héllo wörld — 東京 🙂 the end"


def test_round_trip_with_multibyte_characters(tiny_fp32: ModelFolder) -> None:
    tok = ChatTokenizer(tiny_fp32)
    assert tok.decode(tok.encode(TEXT)) == TEXT


def test_stream_decoder_never_splits_a_character(tiny_fp32: ModelFolder) -> None:
    tok = ChatTokenizer(tiny_fp32)
    ids = tok.encode(TEXT)
    assert len(ids) > len(TEXT.encode()) // 2  # byte-level: multibyte characters span tokens
    stream = StreamDecoder(tok)
    deltas = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(deltas) == TEXT
    assert all("\ufffd" not in d for d in deltas)
    assert "" in deltas  # some tokens ended mid-character and were held back


def test_chat_template_renders_and_specials_become_single_tokens(tiny_fp32: ModelFolder) -> None:
    tok = ChatTokenizer(tiny_fp32)
    text = tok.render_chat(chat_messages("hi", system="be brief"))
    assert text == "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.encode(text)
    assert ids[0] == tok.tokenizer.token_to_id("<|im_start|>")
    assert ids.count(tok.tokenizer.token_to_id("<|im_end|>")) == 2


@pytest.mark.parametrize("messages", [[], [{"role": "wizard", "content": "x"}], [{"role": "user"}]])
def test_malformed_conversations_are_invalid_arguments(tiny_fp32: ModelFolder, messages: list[dict[str, str]]) -> None:
    with pytest.raises(InvalidArgument):
        ChatTokenizer(tiny_fp32).encode_chat(messages)
