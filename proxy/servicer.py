"""The Generation gRPC servicer: the public API's protobuf in and out; ProxyNode does the rest."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from kvmesh.params_pb import params_from_pb
from kvmesh.v1 import generation_pb2, generation_pb2_grpc
from proxy.node import Call, ProxyNode

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
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        call = Call(
            api_key(context),
            request.session_id,
            messages,
            request.prompt,
            params_from_pb(request.params),
            request.request_id,
        )
        async for event in self.node.serve(call, context.time_remaining()):
            yield event
