"""The token ids of each session's last turn, so that the next turn's prompt reuses the ids the
model generated rather than a re-tokenization of its text (which need not give the same ids, and
would then share no stored block past the first difference).

The chat template renders a reply as text; if the client sends back exactly the text kvmesh
generated, the new prompt is: the last turn's prompt ids + the generated ids + the template's
tokens after the reply. Anything else (an edited history, another client's, a reply cut by a stop
string) falls back to the plain tokenization, which still shares the longest common prefix."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from kvmesh.model.tokenizer import ChatTokenizer, Message


def _key(messages: Sequence[Message]) -> tuple[tuple[str, str], ...]:
    return tuple((str(m.get("role", "")), str(m.get("content", ""))) for m in messages)


@dataclass(frozen=True)
class _Turn:
    messages: tuple[tuple[str, str], ...]  # the history the prompt was made of
    rendered: np.ndarray  # encode_chat(messages): what the next turn's tokenization starts with
    sent: np.ndarray  # the prompt ids really sent (themselves maybe spliced)
    reply: str
    generated: np.ndarray  # the ids the model made, its end-of-turn token included


class Conversations:
    """(salt, session) -> its last turn, the `limit` most recent sessions kept (int32 arrays: at
    most ~64 KB per session of 8,192-token context)."""

    def __init__(self, tokenizer: ChatTokenizer, limit: int = 4096) -> None:
        self.tokenizer, self.limit = tokenizer, limit
        self._turns: OrderedDict[tuple[bytes, str], _Turn] = OrderedDict()
        self._lock = threading.Lock()  # plans are made in worker threads, turns recorded on the loop
        self.hits = 0  # prompts spliced from a remembered turn

    def remember(
        self,
        salt: bytes,
        session: str,
        messages: Sequence[Message],
        rendered: Sequence[int],
        sent: Sequence[int],
        reply: str,
        generated: Sequence[int],
    ) -> None:
        if self.limit <= 0:
            return
        turn = _Turn(
            _key(messages),
            np.asarray(rendered, np.int32),
            np.asarray(sent, np.int32),
            reply,
            np.asarray(generated, np.int32),
        )
        with self._lock:
            self._turns[(salt, session)] = turn
            self._turns.move_to_end((salt, session))
            while len(self._turns) > self.limit:
                self._turns.popitem(last=False)

    def tokens(self, salt: bytes, session: str, messages: Sequence[Message], rendered: list[int]) -> list[int]:
        """The prompt for `messages` (`rendered`: their plain encode_chat): the last turn's ids
        spliced in when the history is that turn's, its reply as generated; else `rendered`."""
        with self._lock:
            turn = self._turns.get((salt, session))
        if turn is None:
            return rendered
        history = _key(messages)
        n = len(turn.messages)
        if len(history) <= n + 1 or history[:n] != turn.messages or history[n] != ("assistant", turn.reply):
            return rendered
        r = len(turn.rendered)
        reply = self.tokenizer.encode(turn.reply)
        if rendered[:r] != turn.rendered.tolist() or rendered[r : r + len(reply)] != reply:
            return rendered  # the template did not render the reply as plain text after the prompt
        generated = turn.generated.tolist()
        if generated and generated[-1] in self.tokenizer.eos_token_ids:
            generated.pop()  # the template writes its own end-of-turn marker next
        if self.tokenizer.decode(generated) != turn.reply:
            return rendered  # a stop string or held-back text: the ids are not the text
        self.hits += 1
        return [*turn.sent.tolist(), *generated, *rendered[r + len(reply) :]]
