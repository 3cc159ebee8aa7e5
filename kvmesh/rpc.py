"""The one boundary between kvmesh's errors and gRPC status codes, for every server.

`ErrorBoundary` wraps every method of a server (ours, health, reflection): a request that does not
decode is INVALID_ARGUMENT (grpc would say UNKNOWN), a `KvmeshError` its own status, and anything
else INTERNAL, logged with the method; never UNKNOWN, never a dead node. Servicers just raise.
"""

from __future__ import annotations

import hmac
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc

from kvmesh.aio import Stalled
from kvmesh.errors import InvalidArgument, KvmeshError, Upstream

log = logging.getLogger(__name__)
OnError = Callable[[str, str], None]  # (method, status name), e.g. for a metric


def status_of(error: KvmeshError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, error.status, grpc.StatusCode.INTERNAL)


# What a node passes on from a call to another node as it came; anything else (UNKNOWN, INTERNAL,
# a reset connection) is the other node being unavailable to this request.
PASSED_ON = {
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DATA_LOSS,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.UNAVAILABLE,
}


def upstream(error: grpc.aio.AioRpcError | Stalled, where: str) -> Upstream:
    """The one inbound translator: a failed or stalled call to another node as kvmesh's own error."""
    if isinstance(error, Stalled):
        return Upstream("UNAVAILABLE", f"{where}: {error}")
    code = error.code()
    status = code.name if code in PASSED_ON else "UNAVAILABLE"
    return Upstream(status, f"{where}: {error.details() or code.name}"[:1000])


class _Undecodable:
    def __init__(self, error: Exception) -> None:
        self.error = error


def _decoder(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any]:
    def decode(data: bytes) -> Any:
        if deserialize is None:
            return data
        try:
            return deserialize(data)
        except Exception as e:  # protobuf's DecodeError, bad UTF-8 in a string field, ...
            return _Undecodable(e)

    return decode


class _Guard:
    """Turns what one call raised into its status."""

    def __init__(self, method: str, on_error: OnError | None) -> None:
        self.method, self.on_error = method, on_error

    async def check(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        if isinstance(request, _Undecodable):
            await self.fail(context, grpc.StatusCode.INVALID_ARGUMENT, f"undecodable request: {request.error}"[:300])

    async def fail(self, context: grpc.aio.ServicerContext[Any, Any], code: grpc.StatusCode, message: str) -> None:
        if self.on_error is not None:
            self.on_error(self.method, code.name)
        await context.abort(code, message)

    async def handle(self, error: BaseException, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        if isinstance(error, KvmeshError):
            await self.fail(context, status_of(error), str(error))
        log.exception("%s failed", self.method, exc_info=error)
        await self.fail(context, grpc.StatusCode.INTERNAL, f"internal error in {self.method}")


def _refuse(handler: Handler, guard: _Guard) -> Handler:
    """An internal call without the cluster token: UNAUTHENTICATED, before its request is read."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await guard.fail(context, grpc.StatusCode.UNAUTHENTICATED, "an internal call without the cluster's token")

    async def refuse_stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        await refuse(request, context)
        yield None  # unreachable: abort raised

    decode = _decoder(None)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse, decode, handler.response_serializer)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse_stream, decode, handler.response_serializer)
    return grpc.unary_unary_rpc_method_handler(refuse, decode, handler.response_serializer)


def _passes(error: BaseException) -> bool:
    """What the boundary lets through: an abort already made, a cancelled call."""
    return isinstance(error, grpc.aio.AbortError) or not isinstance(error, Exception)


def _unary(behavior: Callable[..., Awaitable[Any]], guard: _Guard) -> Callable[..., Awaitable[Any]]:
    async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await guard.check(request, context)
        try:
            return await behavior(request, context)
        except BaseException as e:
            if _passes(e):
                raise
            await guard.handle(e, context)

    return call


def _streaming(behavior: Callable[..., AsyncIterator[Any]], guard: _Guard) -> Callable[..., AsyncIterator[Any]]:
    async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        await guard.check(request, context)
        try:
            async for item in behavior(request, context):
                yield item
        except BaseException as e:
            if _passes(e):
                raise
            await guard.handle(e, context)

    return call


def _client_streaming(behavior: Callable[..., Awaitable[Any]], guard: _Guard) -> Callable[..., Awaitable[Any]]:
    """A request stream whose messages are checked one by one as the servicer reads them."""

    async def call(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        async def checked() -> AsyncIterator[Any]:
            async for request in requests:
                if isinstance(request, _Undecodable):
                    raise InvalidArgument(f"undecodable request: {request.error}"[:300])
                yield request

        try:
            return await behavior(checked(), context)
        except BaseException as e:
            if _passes(e):
                raise
            await guard.handle(e, context)

    return call


if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]  # generic in the type stubs only


TOKEN_KEY = "x-kvmesh-cluster-token"
INTERNAL = ("/kvmesh.v1.Prefill/", "/kvmesh.v1.Decode/")  # the services only the cluster calls


class _Token:
    """Puts the cluster token on every call of a channel to another node."""

    def __init__(self, token: str) -> None:
        self.token = token

    def _with_token(self, details: Any) -> Any:
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        metadata.add(TOKEN_KEY, self.token)
        return details._replace(metadata=metadata)


# grpc.aio files an interceptor under the first kind it is an instance of: one class per kind
class _UnaryToken(_Token, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._with_token(details), request)


class _StreamToken(_Token, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._with_token(details), request)


class _UploadToken(_Token, grpc.aio.StreamUnaryClientInterceptor):  # StoreKV: a decode node's write-back
    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._with_token(details), requests)


def cluster_channel(address: str, token: str, options: list[tuple[str, Any]]) -> grpc.aio.Channel:
    """A channel to another node of the cluster: its calls carry the cluster token, if one is set."""
    interceptors: list[Any] | None = [_UnaryToken(token), _StreamToken(token), _UploadToken(token)] if token else None
    return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)


def token_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """For a blocking call to a node (kvmesh status)."""
    return ((TOKEN_KEY, token),) if token else ()


class ErrorBoundary(grpc.aio.ServerInterceptor):
    """on_error: told of every error status; token: the cluster's, required on the internal services."""

    def __init__(self, on_error: OnError | None = None, token: str = "") -> None:
        self.on_error, self.token = on_error, token

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(details)
        if handler is not None and self.token and details.method.startswith(INTERNAL):
            sent = dict(details.invocation_metadata or ()).get(TOKEN_KEY)
            if not isinstance(sent, str) or not hmac.compare_digest(sent, self.token):
                return _refuse(handler, _Guard(details.method, self.on_error))
        if handler is None:
            return handler
        guard = _Guard(details.method, self.on_error)
        decode, encode = _decoder(handler.request_deserializer), handler.response_serializer
        if handler.request_streaming and inspect.iscoroutinefunction(handler.stream_unary):
            return grpc.stream_unary_rpc_method_handler(_client_streaming(handler.stream_unary, guard), decode, encode)
        if handler.response_streaming and inspect.isasyncgenfunction(handler.unary_stream):
            return grpc.unary_stream_rpc_method_handler(_streaming(handler.unary_stream, guard), decode, encode)
        if not handler.response_streaming and inspect.iscoroutinefunction(handler.unary_unary):
            return grpc.unary_unary_rpc_method_handler(_unary(handler.unary_unary, guard), decode, encode)
        return handler
