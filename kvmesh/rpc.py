"""The one boundary between kvmesh's errors and gRPC status codes, for every servicer."""

from __future__ import annotations

import grpc

from kvmesh.errors import KvmeshError


def status_of(error: KvmeshError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, error.status, grpc.StatusCode.INTERNAL)


async def abort(context: grpc.aio.ServicerContext[object, object], error: KvmeshError) -> None:
    """End the call with the error's status and message (raises, as grpc.aio's abort does)."""
    await context.abort(status_of(error), str(error))
