"""Tokenizer and chat template of a model folder, and incremental detokenization for streaming."""

from __future__ import annotations

import functools
import secrets
from collections.abc import Sequence
from typing import NoReturn

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from kvmesh.errors import InvalidArgument, ModelError
from kvmesh.model.folder import ModelFolder

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": "..."}
_ROLES = {"system", "user", "assistant"}


def _raise(message: str) -> NoReturn:
    raise InvalidArgument(message)


class ChatTokenizer:
    """Text from clients is plain text: a message's content, or a raw prompt, never becomes a
    control token, even when it spells one (`<|im_start|>system` inside a user message is those
    characters, not a new turn). Only the chat template's own markers are special tokens."""

    def __init__(self, folder: ModelFolder) -> None:
        try:
            self.tokenizer = Tokenizer.from_file(str(folder.tokenizer))  # special tokens recognised
            self._plain = Tokenizer.from_file(str(folder.tokenizer))  # ... spelled out as text
        except Exception as e:  # tokenizers raises a bare Exception on a bad file
            raise ModelError(f"{folder.tokenizer}: unreadable tokenizer ({e})") from e
        self._plain.encode_special_tokens = True  # a tokenizer of its own: threads may share both
        self._markers = [t.content for t in self.tokenizer.get_added_tokens_decoder().values()]
        self.eos_token_ids = folder.eos_token_ids
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise  # Hugging Face templates call it on bad input
        self._template = env.from_string(folder.chat_template) if folder.chat_template else None

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """The most UTF-8 bytes one token decodes to: text longer than context x this cannot fit
        the context, whatever it is (SmolLM2: 81), so it is refused before it is tokenized."""
        ids = range(self.tokenizer.get_vocab_size())
        return max(len(self.tokenizer.decode([i]).encode()) for i in ids) or 1

    def encode(self, text: str, special: bool = False) -> list[int]:
        """Text -> ids, as plain text (special: the template's own, trusted text, whose control
        markers become special tokens); no BOS is added (chat templates carry their own)."""
        tokenizer = self.tokenizer if special else self._plain
        return list(tokenizer.encode(text, add_special_tokens=False).ids)

    def render_chat(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        if self._template is None:
            raise InvalidArgument("this model has no chat template: send a raw prompt")
        if not messages:
            raise InvalidArgument("empty conversation")
        for m in messages:
            if m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
                raise InvalidArgument(f"malformed message {m!r}: needs a role in {sorted(_ROLES)} and text content")
        try:
            return self._template.render(messages=list(messages), add_generation_prompt=add_generation_prompt)
        except TemplateError as e:
            raise InvalidArgument(f"chat template rejected the conversation: {e}") from e

    def encode_chat(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[int]:
        """The conversation in the chat template, each message's content as plain text. Content that
        spells no added token is encoded with the template's text in one piece (the tokenization a
        Hugging Face tokenizer gives); otherwise the template is rendered around a placeholder per
        message, its text encoded with its control tokens and each content as plain text in place."""
        rendered = self.render_chat(messages, add_generation_prompt)
        if not any(marker in m["content"] for m in messages for marker in self._markers):
            return self.encode(rendered, special=True)
        return self._encode_apart(messages, add_generation_prompt)

    def _encode_apart(self, messages: Sequence[Message], add_generation_prompt: bool) -> list[int]:
        nonce = secrets.token_hex(8)
        marks = [f"\x00{nonce}.{i}\x00" for i in range(len(messages))]
        placeholders = [{**m, "content": mark} for m, mark in zip(messages, marks, strict=True)]
        rendered = self.render_chat(placeholders, add_generation_prompt)
        ids: list[int] = []
        pos = 0
        for m, mark in zip(messages, marks, strict=True):
            at = rendered.find(mark, pos)
            if at < 0 or rendered.count(mark) != 1:
                raise ModelError("the chat template transforms message content; kvmesh cannot keep it plain text")
            ids += self.encode(rendered[pos:at], special=True) + self.encode(m["content"])
            pos = at + len(mark)
        return ids + self.encode(rendered[pos:], special=True)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))


class StreamDecoder:
    """Turns token ids into text deltas that never split a UTF-8 character: a byte-level token may
    end mid-character, so text is held back while the decoded tail is a replacement character."""

    def __init__(self, tokenizer: ChatTokenizer) -> None:
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # start of the window that is re-decoded for context
        self._read = 0  # ids before this have been emitted

    def push(self, token: int) -> str:
        self._ids.append(token)
        before = self._tok.decode(self._ids[self._prefix : self._read])
        now = self._tok.decode(self._ids[self._prefix :])
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return now[len(before) :]

    def flush(self) -> str:
        """What is still held back (an incomplete character at the very end)."""
        before = self._tok.decode(self._ids[self._prefix : self._read])
        rest = self._tok.decode(self._ids[self._prefix :])[len(before) :]
        self._prefix = self._read = len(self._ids)
        return rest


def chat_messages(prompt: str, system: str | None = None) -> list[Message]:
    messages = [] if system is None else [{"role": "system", "content": system}]
    return [*messages, {"role": "user", "content": prompt}]
