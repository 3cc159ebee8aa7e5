"""The proxy's request path: who is asking (API key -> tenant -> salt), the prompt (chat template,
tokens, block keys), where it goes (routing policy over the backends), then the decode node's
stream relayed to the client, retried once on the next candidate if it fails before any token."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass

import grpc

from kvmesh.aio import PER_TOKEN_S, Stalled, within
from kvmesh.blockhash import block_keys, root_key
from kvmesh.client import Reply
from kvmesh.errors import InvalidArgument, Unauthenticated, Unavailable, Upstream
from kvmesh.model.folder import ModelFolder
from kvmesh.model.prepare import default_model_dir
from kvmesh.model.tokenizer import ChatTokenizer, Message
from kvmesh.params_pb import params_to_pb
from kvmesh.rpc import upstream
from kvmesh.sampling import SamplingParams
from kvmesh.v1 import decode_pb2, decode_pb2_grpc, generation_pb2
from proxy.backends import Backends
from proxy.config import ProxyConfig
from proxy.conversations import Conversations
from proxy.metrics import ProxyMetrics
from proxy.routing import Decision, NodeState, Request, make_policy
from proxy.tenants import Tenant

NO_RETRY = {"INVALID_ARGUMENT", "FAILED_PRECONDITION", "CANCELLED", "DEADLINE_EXCEEDED", "UNAUTHENTICATED"}


log = logging.getLogger(__name__)
WAIT_HEALTHY_S = 5.0  # a request finding no healthy node waits this long for one before UNAVAILABLE


MAX_ID_CHARS = 256  # session and request ids
MAX_MESSAGES = 4096


def _check_sizes(session_id: str, request_id: str, messages: Sequence[Message], prompt: str, fits: int) -> None:
    """Refuse by size, before any tokenizing: ids, the number of messages, and text that could not
    fit the context (`fits`: context x the most bytes one token covers)."""
    if len(session_id) > MAX_ID_CHARS or len(request_id) > MAX_ID_CHARS:
        raise InvalidArgument(f"session and request ids are at most {MAX_ID_CHARS} characters")
    if len(messages) > MAX_MESSAGES:
        raise InvalidArgument(f"at most {MAX_MESSAGES} messages")
    size = len(prompt.encode()) + sum(len(str(m.get("content", "")).encode()) for m in messages)
    if size > fits:
        raise InvalidArgument(f"a prompt of {size} bytes cannot fit the model's context (at most {fits} bytes)")


def _others(pool: list[NodeState], exclude: set[str]) -> list[NodeState]:
    """The healthy nodes of a pool not in `exclude`, or all its healthy nodes if that leaves none."""
    healthy = [n for n in pool if n.healthy]
    return [n for n in healthy if n.node_id not in exclude] or healthy


class _Retry(Exception):
    """An attempt that failed before its first token: the next candidate may take the request."""

    def __init__(self, error: Upstream) -> None:
        super().__init__(str(error))
        self.error = error


@dataclass(frozen=True)
class Call:
    """A request as either front door (gRPC Generate, the OpenAI HTTP API) hands it over."""

    api_key: str | None
    session_id: str
    messages: Sequence[Message]
    prompt: str
    params: SamplingParams
    request_id: str = ""


@dataclass(frozen=True)
class Plan:
    request_id: str
    session_id: str
    tokens: list[int]
    salt: bytes
    params: SamplingParams
    messages: Sequence[Message] = ()  # a chat's, with its plain tokenization (a raw prompt: none)
    rendered: Sequence[int] = ()
    remember: bool = False  # the client named the session: its turn is kept for the next one


class ProxyNode:
    def __init__(self, config: ProxyConfig) -> None:
        self.config = config
        self.folder = ModelFolder.load(config.model or default_model_dir("int4"))
        self.tokenizer = ChatTokenizer(self.folder)
        self.context = self.folder.context_length or 1 << 30
        self.max_prompt_bytes = self.tokenizer.max_token_bytes * self.context
        self.backends = Backends(config.prefill, config.decode, config.block_size, config.worker, config.cluster_token)
        self.policy = make_policy(config.policy, config.load_bound)
        self.tenants = config.tenants()
        self.metrics = ProxyMetrics()
        self.conversations = Conversations(self.tokenizer, config.sessions_kept)
        self.active = 0  # Generate calls in progress (drain waits for none)
        self.draining = False

    def tenant(self, api_key: str | None) -> Tenant | None:
        """Keys configured: the key must name a tenant (its secret salt, its share). Else open: None,
        one shared salt, no per-tenant limits."""
        if not self.tenants:
            return None
        if not api_key:
            raise Unauthenticated("an API key is required (metadata 'authorization: Bearer KEY' or 'x-api-key')")
        tenant = self.tenants.get(api_key)
        if tenant is None:
            raise Unauthenticated("unknown API key")
        return tenant

    async def serve(self, call: Call, timeout_s: float | None) -> AsyncIterator[generation_pb2.GenerateEvent]:
        """The one path of every front door: the tenant (API key), the plan (tokenized off the event
        loop: up to a context's worth of text), the tenant's limits, then generate."""
        tenant = self.tenant(call.api_key)
        salt = tenant.salt if tenant else b""
        plan = await asyncio.to_thread(
            self.plan, call.session_id, call.messages, call.prompt, call.params, salt, call.request_id
        )
        with tenant.call(len(plan.tokens) + call.params.max_tokens) if tenant else contextlib.nullcontext():
            async for event in self.generate(plan, timeout_s):
                yield event

    def plan(
        self,
        session_id: str,
        messages: Sequence[Message],
        prompt: str,
        params: SamplingParams,
        salt: bytes,
        request_id: str,
    ) -> Plan:
        _check_sizes(session_id, request_id, messages, prompt, self.max_prompt_bytes)
        if messages:  # a named session's last turn may give the exact ids of the history
            rendered = self.tokenizer.encode_chat(messages)
            tokens = self.conversations.tokens(salt, session_id, messages, rendered) if session_id else rendered
        else:
            rendered, tokens = [], self.tokenizer.encode(prompt)
        if not tokens:
            raise InvalidArgument("empty prompt: send messages or a prompt")
        if len(tokens) >= self.context:
            raise InvalidArgument(f"prompt of {len(tokens)} tokens does not fit the model's context of {self.context}")
        if len(tokens) + params.max_tokens > self.context:
            room = self.context - len(tokens)
            raise InvalidArgument(f"max_tokens {params.max_tokens} goes beyond the context: {room} tokens are left")
        request_id = request_id or uuid.uuid4().hex
        remember = bool(messages and session_id)
        return Plan(request_id, session_id or request_id, tokens, salt, params, messages, rendered, remember)

    def keys(self, plan: Plan) -> list[bytes]:
        root = root_key(self.folder.fingerprint, self.backends.block_size, plan.salt)
        return block_keys(root, plan.tokens, self.backends.block_size)

    def route(self, plan: Plan, keys: list[bytes], exclude: set[str]) -> tuple[Decision, str]:
        """(prefill decision, decode node); nodes in `exclude` failed this request already, and are
        taken again only when a pool has no other healthy node (which of the two failed is not
        always known: a stalled call may be either's; one that is down is unhealthy by now)."""
        workers = self.backends.workers
        prefill = _others(list(self.backends.prefill.values()), exclude)
        decode = _others([n for n in self.backends.decode.values() if n.node_id not in workers], exclude)
        try:
            decision = self.policy.choose(
                prefill, Request(plan.session_id, keys, len(plan.tokens), self.backends.block_size)
            )
        except LookupError as e:
            raise Unavailable("no healthy prefill node") from e
        if decision.node_id in workers:  # colocated: it decodes what it prefilled, no transfer
            return decision, decision.node_id
        if not decode:
            raise Unavailable("no healthy decode node")
        return decision, min(decode, key=lambda n: (n.inflight, n.queued_tokens)).node_id

    async def generate(self, plan: Plan, timeout_s: float | None) -> AsyncIterator[generation_pb2.GenerateEvent]:
        """The decode node's events relayed, after a Started event; one retry before the first token."""
        if self.draining:
            raise Unavailable("the proxy is draining")
        self.active += 1
        reply = Reply() if plan.remember else None  # text and ids kept only for a session's next turn
        try:
            start, failed, keys = time.perf_counter(), set[str](), self.keys(plan)
            for attempt in (1, 2):
                try:  # aclosing: a client that goes away ends the attempt (and its claim) at once
                    async with contextlib.aclosing(self._attempt(plan, keys, failed, attempt, timeout_s, start)) as it:
                        async for event in it:
                            if reply is not None:
                                reply.add(event)
                            yield event
                    if reply is not None and reply.finished is not None:
                        self.conversations.remember(
                            plan.salt,
                            plan.session_id,
                            plan.messages,
                            plan.rendered,
                            plan.tokens,
                            reply.text,
                            reply.token_ids,
                        )
                    return
                except _Retry as retry:
                    if attempt == 2:
                        raise retry.error from retry
        finally:
            self.active -= 1

    async def _attempt(
        self, plan: Plan, keys: list[bytes], failed: set[str], attempt: int, timeout_s: float | None, start: float
    ) -> AsyncGenerator[generation_pb2.GenerateEvent, None]:
        """One try: route, call the decode node, relay. Failing before the first token it raises
        _Retry (the nodes it tried added to `failed`), after it the error itself."""
        await self.backends.wait_healthy(min(timeout_s or WAIT_HEALTHY_S, WAIT_HEALTHY_S))
        decision, decode_node = self.route(plan, keys, failed)
        self.metrics.decisions.labels(self.policy.name, decision.reason, decision.node_id).inc()
        prefill_node = self.backends.prefill[decision.node_id]
        claim = _Claim(
            prefill_node,
            self.backends.decode[decode_node],
            len(plan.tokens) - decision.cached_tokens,
            [k for k in keys if k not in prefill_node.blocks],
        )
        call = self._decode_call(plan, decision.node_id, decode_node, timeout_s)
        started, relayed = False, 0
        first_s = self.config.stall_timeout_s + PER_TOKEN_S * (claim.work + prefill_node.queued_tokens)
        try:
            async for event in within(call, first_s, self.config.stall_timeout_s):
                if not started:
                    started = True
                    self._routed(plan, decision, decode_node)
                    claim.prefilled()
                    self.metrics.ttft.observe(time.perf_counter() - start)
                    yield self._started(plan, decision, decode_node, attempt)
                if event.HasField("finished"):
                    claim.release()  # before the client hears it: its next request sees the load as it is
                    yield generation_pb2.GenerateEvent(finished=event.finished)
                elif event.HasField("text"):
                    yield generation_pb2.GenerateEvent(text=event.text)
                else:
                    relayed += 1
                    yield generation_pb2.GenerateEvent(token=event.token)
        except (grpc.aio.AioRpcError, Stalled) as e:
            if isinstance(e, Stalled):  # a node that stopped answering: the same as one that failed
                self.metrics.stalls.inc()
            error = upstream(e, f"decode node {decode_node}")
            log.warning(
                "attempt failed",
                extra={
                    "request_id": plan.request_id,
                    "prefill_node": decision.node_id,
                    "decode_node": decode_node,
                    "attempt": attempt,
                    "code": error.status,
                    "error": str(error)[:200],  # may quote client text
                },
            )
            if started:  # the client has tokens: no retry, but say where the stream broke
                raise upstream(e, f"the stream broke after {relayed} tokens from decode node {decode_node}") from e
            if error.status in NO_RETRY:
                raise error from e
            failed.update({decision.node_id, decode_node})  # the next candidate, not these again
            raise _Retry(error) from e
        finally:
            call.cancel()
            claim.release()

    def _routed(self, plan: Plan, decision: Decision, decode_node: str) -> None:
        log.info(
            "routed",
            extra={
                "request_id": plan.request_id,
                "session_id": plan.session_id,
                "prefill_node": decision.node_id,
                "decode_node": decode_node,
                "reason": decision.reason,
                "prompt_tokens": len(plan.tokens),
            },
        )

    def _decode_call(self, plan: Plan, prefill: str, decode: str, timeout_s: float | None) -> grpc.aio.UnaryStreamCall:  # type: ignore[type-arg]
        request = decode_pb2.DecodeRequest(
            request_id=plan.request_id,
            tokens=plan.tokens,
            prefill_node=prefill,
            params=params_to_pb(plan.params),
            cache_salt=plan.salt,
            keep_kv=self.config.write_back,
        )
        return decode_pb2_grpc.DecodeStub(self.backends.channels[decode]).Decode(request, timeout=timeout_s)

    def _started(self, plan: Plan, d: Decision, decode: str, attempt: int) -> generation_pb2.GenerateEvent:
        return generation_pb2.GenerateEvent(
            started=generation_pb2.Started(
                request_id=plan.request_id,
                prefill_node=d.node_id,
                decode_node=decode,
                routing_reason=d.reason,
                prompt_tokens=len(plan.tokens),
                cached_tokens=d.cached_tokens,
                attempt=attempt,
                policy=self.policy.name,
            )
        )

    def nodes(self) -> list[NodeState]:
        return [*self.backends.prefill.values(), *self.backends.decode.values()]


class _Claim:
    """What a routed request holds on its nodes: one in-flight request on each, its prefill work
    queued on the prefill node until the first token, and the blocks it computes there marked
    pending until it ends (by then the node has stored them and said so). Released once."""

    def __init__(self, prefill: NodeState, decode: NodeState, work: int, computes: Sequence[bytes] = ()) -> None:
        self.prefill, self.decode, self.work, self.held = prefill, decode, work, True
        self.computes = computes
        prefill.inflight += 1
        decode.inflight += 1
        for key in computes:
            prefill.pending[key] = prefill.pending.get(key, 0) + 1
        self._queue(work)

    def prefilled(self) -> None:
        self._queue(-self.work)
        self.work = 0

    def release(self) -> None:
        if self.held:
            self.held = False
            self.prefill.inflight -= 1
            self.decode.inflight -= 1
            pending = self.prefill.pending
            for key in self.computes:
                if (left := pending.pop(key) - 1) > 0:
                    pending[key] = left
            self.prefilled()

    def _queue(self, tokens: int) -> None:
        # Load reports asked before this change are stale (Backends drops them); the last one may
        # count this request's whole prompt (asked while the node computed it), so it is forgotten
        # too: left, it would stand for the node's queue until the next report.
        self.prefill.claimed_tokens = max(self.prefill.claimed_tokens + tokens, 0)
        self.prefill.reported_tokens = 0
        self.prefill.changed_at = asyncio.get_running_loop().time()
