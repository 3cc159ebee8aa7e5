"""The Generation gRPC servicer: the public API's protobuf in and out; ProxyNode does the rest."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc

from kvmesh.params_pb import params_from_pb
from kvmesh.v1 import generation_pb2, generation_pb2_grpc
from proxy.node import ProxyNode

Context = grpc.aio.ServicerContext[object, object]


def api_key(context: Context) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "x-api-key":
            return str(value)
        if key == "authorization" and str(value).lower().startswith("bearer "):
            return str(value)[7:].strip()
    return None


class GenerationServicer(generation_pb2_grpc.GenerationServicer):
    def __init__(self, node: ProxyNode) -> None:
        self.node = node

    async def Generate(
        self, request: generation_pb2.GenerateRequest, context: Context
    ) -> AsyncIterator[generation_pb2.GenerateEvent]:
        tenant = self.node.tenant(api_key(context))
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        params = params_from_pb(request.params)
        salt = tenant.salt if tenant else b""
        # tokenizing (up to the context's worth of text) runs off the event loop
        plan = await asyncio.to_thread(
            self.node.plan, request.session_id, messages, request.prompt, params, salt, request.request_id
        )
        with tenant.call(len(plan.tokens) + params.max_tokens) if tenant else contextlib.nullcontext():
            async for event in self.node.generate(plan, context.time_remaining()):
                yield event
