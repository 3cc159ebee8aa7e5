"""A client of kvmesh's one endpoint (the proxy's Generation service), sync and async.

from kvmesh.client import Client
client = Client("127.0.0.1:50051")
for event in client.generate([{"role": "user", "content": "Hi!"}], session_id="s1"):
    ...  # event.started, then event.token (text deltas), maybe event.text, then event.finished
reply = client.chat([{"role": "user", "content": "Hi!"}], session_id="s1")  # collected
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from kvmesh.errors import KvmeshError, from_status
from kvmesh.v1 import generation_pb2, generation_pb2_grpc, stream_pb2

Messages = Sequence[dict[str, str]]


@dataclass
class Reply:
    """A whole answer: its text and what the proxy said about it."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    started: generation_pb2.Started | None = None
    finished: stream_pb2.Finished | None = None

    def add(self, event: generation_pb2.GenerateEvent) -> None:
        kind = event.WhichOneof("kind")
        if kind == "started":
            self.started = event.started
        elif kind == "token":
            self.text += event.token.text
            self.token_ids.append(event.token.token_id)
        elif kind == "text":  # held-back text released at the end: no token of its own
            self.text += event.text.text
        elif kind == "finished":
            self.finished = event.finished


def request(messages: Messages | None, prompt: str, session_id: str, **params: Any) -> generation_pb2.GenerateRequest:
    chat = [generation_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in messages or ()]
    return generation_pb2.GenerateRequest(
        session_id=session_id, messages=chat, prompt=prompt, params=stream_pb2.GenerationParams(**params)
    )


def _error(e: grpc.RpcError) -> KvmeshError:
    """A failed call as kvmesh's own error: its class (and `.status`) from the status code."""
    if isinstance(e, grpc.Call):
        return from_status(e.code().name, e.details() or e.code().name)
    return from_status("UNAVAILABLE", str(e))


def _metadata(api_key: str | None) -> tuple[tuple[str, str | bytes], ...]:
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


class Client:
    def __init__(self, endpoint: str, api_key: str | None = None) -> None:
        self.channel = grpc.insecure_channel(endpoint)
        self.stub = generation_pb2_grpc.GenerationStub(self.channel)
        self.api_key = api_key

    def generate(
        self,
        messages: Messages | None = None,
        prompt: str = "",
        session_id: str = "",
        timeout: float | None = None,
        **params: Any,
    ) -> Iterator[generation_pb2.GenerateEvent]:
        """The proxy's events; a failed call raises a KvmeshError (InvalidArgument, ResourceExhausted,
        Unauthenticated, Unavailable, ...; `.status` the status code's name), from the grpc error."""
        try:
            yield from self.stub.Generate(
                request(messages, prompt, session_id, **params), timeout=timeout, metadata=_metadata(self.api_key)
            )
        except grpc.RpcError as e:
            raise _error(e) from e

    def chat(self, messages: Messages, session_id: str = "", **params: Any) -> Reply:
        reply = Reply()
        for event in self.generate(messages, session_id=session_id, **params):
            reply.add(event)
        return reply

    def close(self) -> None:
        self.channel.close()


class AsyncClient:
    def __init__(self, endpoint: str, api_key: str | None = None) -> None:
        self.channel = grpc.aio.insecure_channel(endpoint)
        self.stub = generation_pb2_grpc.GenerationStub(self.channel)
        self.api_key = api_key

    async def generate(
        self,
        messages: Messages | None = None,
        prompt: str = "",
        session_id: str = "",
        timeout: float | None = None,
        **params: Any,
    ) -> AsyncIterator[generation_pb2.GenerateEvent]:
        """As Client.generate."""
        call = self.stub.Generate(
            request(messages, prompt, session_id, **params), timeout=timeout, metadata=_metadata(self.api_key)
        )
        try:
            async for event in call:
                yield event
        except grpc.RpcError as e:
            raise _error(e) from e
        finally:
            call.cancel()  # a no-op once it ended; stops the proxy's work when the caller gave up

    async def chat(self, messages: Messages, session_id: str = "", **params: Any) -> Reply:
        reply = Reply()
        async for event in self.generate(messages, session_id=session_id, **params):
            reply.add(event)
        return reply

    async def close(self) -> None:
        await self.channel.close()
