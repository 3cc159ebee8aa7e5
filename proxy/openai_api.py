"""The OpenAI-compatible HTTP front door, on the proxy's own event loop (aiohttp: it runs on an
existing loop and its StreamResponse.write waits while the client's socket is full, so a slow
reader holds back only its own stream). Every request goes through ProxyNode.serve, as gRPC
Generate does: the same tenancy, plan, routing, retry and metrics.

Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health. A field
that would change the output and that kvmesh cannot honour is a 400 naming it; fields that do
not change it are accepted. Where a request went, and why, is in the response headers
(x-kvmesh-*) and in a `kvmesh` member of the body (the first chunk when streamed)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from kvmesh.errors import InvalidArgument, KvmeshError
from kvmesh.sampling import SamplingParams
from kvmesh.service import MAX_REQUEST_BYTES
from kvmesh.v1 import generation_pb2
from proxy.node import Call, ProxyNode

log = logging.getLogger(__name__)

# What kvmesh's error classes (their gRPC status) answer over HTTP, and OpenAI's error type.
HTTP_STATUS = {
    "INVALID_ARGUMENT": (400, "invalid_request_error"),
    "FAILED_PRECONDITION": (400, "invalid_request_error"),
    "UNAUTHENTICATED": (401, "authentication_error"),
    "NOT_FOUND": (404, "invalid_request_error"),
    "RESOURCE_EXHAUSTED": (429, "rate_limit_error"),
    "CANCELLED": (499, "cancelled"),
    "INTERNAL": (500, "server_error"),
    "DATA_LOSS": (502, "server_error"),
    "UNAVAILABLE": (503, "server_error"),
    "DEADLINE_EXCEEDED": (504, "timeout"),
}
FINISH = {"eos": "stop", "stop": "stop", "length": "length"}
MAX_STOP = 4  # OpenAI's limit

# Fields that change the output and that kvmesh does not do, with the value that means "off".
UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    "tools": lambda v: not v,
    "tool_choice": lambda v: v in (None, "none"),
    "functions": lambda v: not v,
    "function_call": lambda v: v in (None, "none"),
    "response_format": lambda v: v is None or (isinstance(v, dict) and v.get("type") == "text"),
    "logit_bias": lambda v: not v,
    "presence_penalty": lambda v: not v,
    "frequency_penalty": lambda v: not v,
    "n": lambda v: v in (None, 1),
    "best_of": lambda v: v in (None, 1),
    "echo": lambda v: not v,
    "suffix": lambda v: not v,
    "audio": lambda v: v is None,
    "modalities": lambda v: v in (None, ["text"]),
    "prediction": lambda v: v is None,
    "web_search_options": lambda v: v is None,
    "reasoning_effort": lambda v: v is None,
    "top_logprobs": lambda v: not v,  # a decode node gives the sampled token's logprob only
}
# Fields that do not change the output: accepted as they are.
ACCEPTED = {"metadata", "store", "service_tier", "parallel_tool_calls", "stream_options", "user", "safety_identifier"}
COMMON_FIELDS = {
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "seed",
    "stop",
    "stream",
    "logprobs",
    "prompt_cache_key",
}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens"}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt"}


class NotFound(KvmeshError):
    status = "NOT_FOUND"


@dataclass(frozen=True)
class _Parsed:
    call: Call
    stream: bool
    usage_in_stream: bool
    logprobs: bool


def _number(body: dict[str, Any], name: str, kind: type, low: float, high: float) -> Any:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise InvalidArgument(f"{name} must be a number" if kind is float else f"{name} must be an integer")
    if not low <= value <= high:
        raise InvalidArgument(f"{name} must be between {low:g} and {high:g}")
    return kind(value)


def _content(message: dict[str, Any], i: int) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if content is None and message.get("role") == "assistant":
        return ""
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InvalidArgument(f"messages[{i}].content[{j}]: only text parts are supported")
            parts.append(part["text"])
        return "".join(parts)
    raise InvalidArgument(f"messages[{i}].content must be a string or a list of text parts")


def _messages(body: dict[str, Any]) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidArgument("messages must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InvalidArgument(f"messages[{i}] must be an object")
        role = m.get("role")
        role = "system" if role == "developer" else role
        if role not in ("system", "user", "assistant"):
            raise InvalidArgument(f"messages[{i}].role must be system, developer, user or assistant")
        if m.get("tool_calls") or m.get("function_call"):
            raise InvalidArgument(f"messages[{i}]: tool calls are not supported")
        out.append({"role": str(role), "content": _content(m, i)})
    return out


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops) or len(stops) > MAX_STOP:
        raise InvalidArgument(f"stop must be a string or a list of at most {MAX_STOP} strings")
    return tuple(stops)


def parse(body: Any, chat: bool, model_id: str, api_key: str | None, session_header: str) -> _Parsed:
    """An OpenAI request body -> the proxy's Call; InvalidArgument (400) naming the field, or
    NotFound (404) for another model."""
    if not isinstance(body, dict):
        raise InvalidArgument("the request body must be a JSON object")
    known = (CHAT_FIELDS if chat else COMPLETION_FIELDS) | ACCEPTED | set(UNSUPPORTED)
    for name in body:
        if name not in known:
            raise InvalidArgument(f"unrecognized request field: {name[:64]}")
    for name, off in UNSUPPORTED.items():
        if name in body and not off(body[name]):
            raise InvalidArgument(f"{name} is not supported by kvmesh")
    model = body.get("model", model_id)
    if model != model_id:
        raise NotFound(f"the model {str(model)[:64]!r} does not exist; this endpoint serves {model_id!r}")
    max_tokens = _number(body, "max_completion_tokens", int, 1, 1 << 20) or _number(body, "max_tokens", int, 1, 1 << 20)
    temperature = _number(body, "temperature", float, 0.0, 2.0)
    params = SamplingParams(
        temperature=1.0 if temperature is None else temperature,  # OpenAI's default samples
        top_p=_number(body, "top_p", float, 0.0, 1.0) or 1.0,  # 0 is read as 1, as on kvmesh's wire
        seed=_number(body, "seed", int, 0, 2**63 - 1),
        max_tokens=max_tokens or 256,
        stop=_stop(body),
    )
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise InvalidArgument("stream_options must be an object")
    session = body.get("prompt_cache_key") or body.get("user") or session_header
    if not isinstance(session, str):
        raise InvalidArgument("user and prompt_cache_key must be strings")
    if chat:
        messages, prompt = _messages(body), ""
    else:
        raw = body.get("prompt")
        raw = raw[0] if isinstance(raw, list) and len(raw) == 1 else raw
        if not isinstance(raw, str) or not raw:
            raise InvalidArgument("prompt must be a non-empty string")
        prompt = raw
        messages = []
    return _Parsed(
        Call(api_key, session, messages, prompt, params),
        bool(body.get("stream", False)),
        bool(options.get("include_usage", False)),
        bool(body.get("logprobs", False)),
    )


def _api_key(request: web.Request) -> str | None:
    auth = request.headers.get("authorization", "")
    return auth[7:].strip() if auth.lower().startswith("bearer ") else request.headers.get("x-api-key")


def error_body(status: str, message: str, param: str | None = None) -> tuple[int, dict[str, Any]]:
    http, kind = HTTP_STATUS.get(status, (500, "server_error"))
    code = "model_not_found" if status == "NOT_FOUND" else status.lower()
    return http, {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _kvmesh(started: generation_pb2.Started) -> dict[str, Any]:
    return {
        "request_id": started.request_id,
        "prefill_node": started.prefill_node,
        "decode_node": started.decode_node,
        "routing_reason": started.routing_reason,
        "policy": started.policy,
        "attempt": started.attempt,
        "expected_cached_tokens": started.cached_tokens,
    }


def _headers(started: generation_pb2.Started) -> dict[str, str]:
    route = f"prefill={started.prefill_node}; decode={started.decode_node}; reason={started.routing_reason}"
    return {"x-kvmesh-request-id": started.request_id, "x-kvmesh-route": route}


def _usage(finished: Any) -> dict[str, Any]:
    u = finished.usage
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    }


class OpenAIFrontDoor:
    """The HTTP listener: an aiohttp application on the running loop, the proxy's node behind it."""

    def __init__(self, node: ProxyNode, model_id: str, serving: Callable[[], bool]) -> None:
        self.node, self.model_id, self.serving = node, model_id, serving
        self.created = int(node.folder.path.stat().st_mtime)
        app = web.Application(client_max_size=MAX_REQUEST_BYTES)  # larger bodies: 413 before any work
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        # handler_cancellation: a client that goes away cancels its handler at once, and with it the
        # upstream call (the decode slot is freed at the next step)
        # shutdown_timeout: stop() comes after the gRPC drain, so what still runs is cut after 1 s, not 60
        self.runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0)
        self.port = 0

    async def start(self, host: str, port: int) -> int:
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, port)
        await site.start()
        self.port = int(self.runner.addresses[0][1])
        return self.port

    async def stop(self) -> None:
        await self.runner.cleanup()

    def _count(self, endpoint: str, status: int) -> None:
        self.node.metrics.http_requests.labels(endpoint, str(status)).inc()

    def _json(
        self, endpoint: str, status: int, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> web.Response:
        self._count(endpoint, status)
        return web.json_response(body, status=status, headers=headers)

    def _error(self, endpoint: str, error: KvmeshError) -> web.Response:
        status, body = error_body(error.status, str(error)[:1000])
        retry = {"retry-after": "1"} if status == 429 else None  # a full queue or a tenant's share: soon
        return self._json(endpoint, status, body, retry)

    async def models(self, request: web.Request) -> web.Response:
        try:
            self.node.tenant(_api_key(request))
        except KvmeshError as e:
            return self._error("/v1/models", e)
        model = {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "kvmesh"}
        return self._json("/v1/models", 200, {"object": "list", "data": [model]})

    async def health(self, request: web.Request) -> web.Response:
        ok = self.serving()
        return self._json("/health", 200 if ok else 503, {"status": "SERVING" if ok else "NOT_SERVING"})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, chat=False)

    async def _complete(self, request: web.Request, chat: bool) -> web.StreamResponse:
        endpoint = request.path
        try:
            try:
                body = await request.json()
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise InvalidArgument(f"the request body is not JSON: {e}"[:200]) from e
            key = _api_key(request)
            self.node.tenant(key)  # who asks, before what they ask (401 before 400 or 404)
            parsed = parse(body, chat, self.model_id, key, request.headers.get("x-session-id", ""))
            events = aiter(self.node.serve(parsed.call, None))
            first = await anext(events)  # Started: routed, the first token on its way
        except web.HTTPException:
            raise
        except KvmeshError as e:
            return self._error(endpoint, e)
        except StopAsyncIteration:
            return self._error(endpoint, KvmeshError("the stream ended before it started"))
        reply = _Reply(chat, self.model_id, first.started, parsed.logprobs)
        if parsed.stream:
            return await self._stream(request, endpoint, reply, events, parsed.usage_in_stream)
        try:
            async for event in events:
                reply.add(event)
        except KvmeshError as e:
            return self._error(endpoint, e)
        return self._json(endpoint, 200, reply.whole(), _headers(first.started))

    async def _stream(
        self,
        request: web.Request,
        endpoint: str,
        reply: _Reply,
        events: AsyncIterator[generation_pb2.GenerateEvent],
        usage: bool,
    ) -> web.StreamResponse:
        headers = {"content-type": "text/event-stream", "cache-control": "no-cache", **_headers(reply.started)}
        response = web.StreamResponse(status=200, headers=headers)
        await response.prepare(request)
        self._count(endpoint, 200)

        async def send(data: dict[str, Any] | str) -> None:  # waits while the client's socket is full
            text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
            await response.write(f"data: {text}\n\n".encode())

        try:
            await send(reply.chunk(reply.first_delta(), None, extra=True))
            async for event in events:
                if (delta := reply.add(event)) is not None:
                    await send(reply.chunk(delta, None))
            await send(reply.chunk({} if reply.chat else "", reply.finish_reason))
            if usage and reply.finished is not None:
                await send({**reply.envelope(chunk=True), "choices": [], "usage": _usage(reply.finished)})
            await send("[DONE]")
        except KvmeshError as e:  # after the first byte the status is sent: the error is an event
            await send(error_body(e.status, str(e)[:1000])[1])
        except (ConnectionResetError, ConnectionError):
            log.info("client went away mid-stream", extra={"request_id": reply.started.request_id})
            return response
        finally:
            await events.aclose()  # type: ignore[attr-defined]
        await response.write_eof()
        return response


class _Reply:
    """One completion as it streams in: text, logprobs, finish, in OpenAI's shapes."""

    def __init__(self, chat: bool, model: str, started: generation_pb2.Started, logprobs: bool) -> None:
        self.chat, self.model, self.started, self.logprobs = chat, model, started, logprobs
        self.created = int(time.time())
        self.text, self.tokens = "", list[dict[str, Any]]()
        self.finished: Any = None

    @property
    def finish_reason(self) -> str:
        return FINISH.get(self.finished.finish_reason, "stop") if self.finished is not None else "stop"

    def envelope(self, chunk: bool = False) -> dict[str, Any]:
        prefix = "chatcmpl-" if self.chat else "cmpl-"
        kind = ("chat.completion" if self.chat else "text_completion") + (".chunk" if chunk and self.chat else "")
        return {"id": prefix + self.started.request_id, "object": kind, "created": self.created, "model": self.model}

    def add(self, event: generation_pb2.GenerateEvent) -> dict[str, Any] | str | None:
        """-> the delta to stream (None: nothing to send)."""
        kind = event.WhichOneof("kind")
        if kind == "finished":
            self.finished = event.finished
            return None
        if kind == "token":
            text, token = event.token.text, event.token
            if self.logprobs:
                raw = list(text.encode())
                self.tokens.append({"token": text, "logprob": token.logprob, "bytes": raw, "top_logprobs": []})
        elif kind == "text":
            text = event.text.text
        else:
            return None
        self.text += text
        if not text:
            return None
        return {"content": text} if self.chat else text

    def first_delta(self) -> dict[str, Any] | str:
        return {"role": "assistant", "content": ""} if self.chat else ""

    def chunk(self, delta: dict[str, Any] | str, finish: str | None, extra: bool = False) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish}
        if self.chat:
            choice["delta"] = delta
        else:
            choice["text"] = delta
        if self.logprobs and self.tokens and finish is None and not extra:
            choice["logprobs"] = {"content": [self.tokens[-1]]} if self.chat else None
        body = {**self.envelope(chunk=True), "choices": [choice]}
        return {**body, "kvmesh": _kvmesh(self.started)} if extra else body

    def whole(self) -> dict[str, Any]:
        logprobs = {"content": self.tokens} if self.logprobs and self.chat else None
        if self.chat:
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": self.text, "refusal": None},
                "logprobs": logprobs,
                "finish_reason": self.finish_reason,
            }
        else:
            choice = {"index": 0, "text": self.text, "logprobs": None, "finish_reason": self.finish_reason}
        usage = _usage(self.finished) if self.finished is not None else None
        return {**self.envelope(), "choices": [choice], "usage": usage, "kvmesh": _kvmesh(self.started)}
