"""The proxy's request path: who is asking (API key -> tenant -> salt), the prompt (chat template,
tokens, block keys), where it goes (routing policy over the backends), then the decode node's
stream relayed to the client, retried on the next candidate if it fails before any token (as often
as a stream may migrate), and migrated to another node if it breaks after: the prompt and the
tokens sent as the new prompt, the same seed, so the client sees one stream, as if nothing had
happened."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass, field

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
from kvmesh.v1 import decode_pb2, decode_pb2_grpc, generation_pb2, stream_pb2
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


STALL_PATIENCE = 4  # a healthy node silent as a whole is waited for this many stall timeouts at most
MIGRATION_BACKOFF_S = 0.2  # times the migrations so far, after a move that failed before its first token
REPLAY_S = 0.05  # a migrated stream's first token may wait this much more per token sent (decode steps)


def _reason(e: grpc.aio.AioRpcError | Stalled, error: Upstream) -> str:
    """A migration's reason, the metric's label."""
    if isinstance(e, Stalled):
        return "stalled"
    if error.status == "UNAVAILABLE" and "draining" in str(error):
        return "draining"
    return error.status.lower()


class _Broken(Exception):
    """An attempt that failed after tokens reached the client: the stream may migrate."""

    def __init__(self, error: Upstream, reason: str, decode_node: str, prefill_node: str) -> None:
        super().__init__(str(error))
        self.error, self.reason = error, reason
        self.decode_node, self.prefill_node = decode_node, prefill_node
        # the decode node names its prefill node when that one failed (a KV stream cut off)
        self.prefill_failed = f"prefill node {prefill_node}" in str(error)


@dataclass
class _Progress:
    """A request's stream so far, across its attempts: what the client has, and its migrations."""

    start: float
    ids: list[int] = field(default_factory=list)  # output tokens relayed
    tried: list[str] = field(default_factory=list)  # decode nodes, in order
    migrations: list[stream_pb2.Migration] = field(default_factory=list)
    cached_tokens: int = 0  # the first prefill's
    last_token_at: float = 0.0
    failed_at: float = 0.0
    error: str = ""  # the last attempt's

    def broke(self, why: str) -> str:
        """Why a stream ends here: where it broke, why it goes no further, the nodes it tried."""
        return (
            f"the stream broke after {len(self.ids)} tokens ({self.error}); not migrated: {why}; "
            f"decode nodes tried: {', '.join(self.tried)}"
        )

    def sent(self, token_id: int) -> None:
        now = time.perf_counter()
        if self.migrations and not self.migrations[-1].resume_ms:
            self.migrations[-1].resume_ms = (now - self.failed_at) * 1000
        self.ids.append(token_id)
        self.last_token_at = now

    def resumed(self, prefilled: decode_pb2.Prefilled, prefill_node: str, decode_node: str) -> None:
        m = self.migrations[-1]
        m.to_prefill_node, m.to_decode_node = prefill_node, decode_node
        m.cached_tokens, m.replayed_tokens = prefilled.cached_tokens, prefilled.replayed_tokens

    def finished(self, plan: Plan, last: stream_pb2.Finished) -> stream_pb2.Finished:
        """The whole request's: its prompt, its first prefill's cached tokens, every token sent."""
        if not self.migrations:
            return last
        usage = stream_pb2.Usage(
            prompt_tokens=len(plan.tokens), cached_tokens=self.cached_tokens, completion_tokens=len(self.ids)
        )
        return stream_pb2.Finished(
            finish_reason=last.finish_reason, usage=usage, timings=last.timings, migrations=self.migrations
        )


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


def _no_limit(tokens: int) -> None:
    """No tenants configured: nothing to hold."""


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
        """The one path of every front door: the tenant (API key) and a stream of its share, the plan
        (tokenized off the event loop: up to a context's worth of text), its tokens of the share,
        then generate."""
        tenant = self.tenant(call.api_key)
        salt = tenant.salt if tenant else b""
        with tenant.call() if tenant else contextlib.nullcontext(_no_limit) as hold:
            plan = await asyncio.to_thread(
                self.plan, call.session_id, call.messages, call.prompt, call.params, salt, call.request_id
            )
            hold(len(plan.tokens) + call.params.max_tokens)
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
        if params.seed is None and not params.greedy:  # a migration goes on drawing from this seed
            params = dataclasses.replace(params, seed=secrets.randbits(63))
        return Plan(request_id, session_id or request_id, tokens, salt, params, messages, rendered, remember)

    def keys(self, tokens: Sequence[int], salt: bytes) -> list[bytes]:
        root = root_key(self.folder.fingerprint, self.backends.block_size, salt)
        return block_keys(root, tokens, self.backends.block_size)

    def route(self, plan: Plan, tokens: Sequence[int], keys: list[bytes], exclude: set[str]) -> tuple[Decision, str]:
        """(prefill decision, decode node); nodes in `exclude` failed this request already, and are
        taken again only when a pool has no other healthy node (which of the two failed is not
        always known: a stalled call may be either's; one that is down is unhealthy by now)."""
        workers = self.backends.workers
        prefill = _others(list(self.backends.prefill.values()), exclude)
        decode = _others([n for n in self.backends.decode.values() if n.node_id not in workers], exclude)
        try:
            decision = self.policy.choose(
                prefill, Request(plan.session_id, keys, len(tokens), self.backends.block_size)
            )
        except LookupError as e:
            raise Unavailable("no healthy prefill node") from e
        if decision.node_id in workers:  # colocated: it decodes what it prefilled, no transfer
            return decision, decision.node_id
        if not decode:
            raise Unavailable("no healthy decode node")
        return decision, min(decode, key=lambda n: (n.inflight, n.queued_tokens)).node_id

    async def generate(self, plan: Plan, timeout_s: float | None) -> AsyncIterator[generation_pb2.GenerateEvent]:
        """The decode node's events relayed, after a Started event: before the first token a failed
        attempt is retried on the next candidate, after it a broken stream migrates (either up to
        migration_limit times, at least one retry) and goes on."""
        if self.draining:
            raise Unavailable("the proxy is draining")
        self.active += 1
        reply = Reply() if plan.remember else None  # text and ids kept only for a session's next turn
        progress = _Progress(time.perf_counter())
        try:
            failed, retries = set[str](), 0
            while True:
                try:  # aclosing: a client that goes away ends the attempt (and its claim) at once
                    async with contextlib.aclosing(self._attempt(plan, progress, failed, timeout_s)) as it:
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
                    # before any token: the next candidate, as often as a stream may migrate
                    # (a node lost while the first token was on its way is a migration too)
                    retries += 1
                    if retries > max(1, self.config.migration_limit):
                        raise retry.error from retry
                    if retries > 1:
                        await asyncio.sleep(MIGRATION_BACKOFF_S * retries)
                except _Broken as broken:
                    # a move that failed before it relayed a token: the fleet's view (health, load)
                    # may be behind what broke; a moment before the next try, not three at once
                    moved_without_token = bool(progress.migrations) and not progress.migrations[-1].resume_ms
                    self._migrate(plan, progress, broken, failed)
                    if moved_without_token:
                        await asyncio.sleep(MIGRATION_BACKOFF_S * len(progress.migrations))
        finally:
            self.active -= 1

    def _migrate(self, plan: Plan, progress: _Progress, broken: _Broken, failed: set[str]) -> None:
        """A stream that broke after tokens reached the client goes on elsewhere, unless a limit
        says no: then UNAVAILABLE naming the nodes tried and the tokens delivered."""
        sent, c = len(progress.ids), self.config
        why = ""
        if len(progress.migrations) >= c.migration_limit:
            why = f"migrated {len(progress.migrations)} times already (limit {c.migration_limit})"
        elif c.migration_max_tokens and len(plan.tokens) + sent > c.migration_max_tokens:
            why = f"{len(plan.tokens) + sent} tokens are more than the {c.migration_max_tokens} migrated"
        elif sent >= plan.params.max_tokens:
            why = "every token was sent"
        progress.error = str(broken.error)
        if why:
            raise Unavailable(progress.broke(why)) from broken
        failed.add(broken.decode_node)
        if broken.prefill_failed:
            failed.add(broken.prefill_node)
        self.metrics.migrations.labels(broken.reason).inc()
        now = time.perf_counter()
        progress.failed_at = now
        progress.migrations.append(
            stream_pb2.Migration(
                reason=broken.reason,
                from_decode_node=broken.decode_node,
                tokens_sent=sent,
                detect_ms=(now - progress.last_token_at) * 1000,
            )
        )
        log.warning(
            "migrating",
            extra={
                "request_id": plan.request_id,
                "reason": broken.reason,
                "decode_node": broken.decode_node,
                "prefill_node": broken.prefill_node,
                "tokens_sent": sent,
                "migration": len(progress.migrations),
                "error": str(broken.error)[:200],
            },
        )

    async def _attempt(
        self, plan: Plan, progress: _Progress, failed: set[str], timeout_s: float | None
    ) -> AsyncGenerator[generation_pb2.GenerateEvent, None]:
        """One try: route, call the decode node, relay. Failing before any token reached the client
        it raises _Retry (the nodes it tried added to `failed`), after it _Broken; a status that no
        other node would change (a bad request, the client's deadline) is raised as it is."""
        tokens = [*plan.tokens, *progress.ids]  # a migration: the prompt and the output sent
        left = None if timeout_s is None else max(timeout_s - (time.perf_counter() - progress.start), 0.001)
        await self.backends.wait_healthy(min(left or WAIT_HEALTHY_S, WAIT_HEALTHY_S))
        keys = self.keys(tokens, plan.salt)
        try:
            decision, decode_node = self.route(plan, tokens, keys, failed)
        except Unavailable as e:
            if progress.ids:  # a migration with nowhere to go
                raise Unavailable(progress.broke(str(e))) from e
            raise
        self.metrics.decisions.labels(self.policy.name, decision.reason, decision.node_id).inc()
        prefill_node = self.backends.prefill[decision.node_id]
        claim = _Claim(
            prefill_node,
            self.backends.decode[decode_node],
            len(tokens) - decision.cached_tokens,
            [k for k in keys if k not in prefill_node.blocks],
        )
        progress.tried.append(decode_node)
        first, resumed = True, bool(progress.ids)
        first_s = self.config.stall_timeout_s + PER_TOKEN_S * (claim.work + prefill_node.queued_tokens)
        first_s += REPLAY_S * len(progress.ids)  # at worst every token sent runs through a decode step again
        call = self._decode_call(plan, tokens, len(progress.ids), (decision.node_id, decode_node, first_s), left)
        decoder, stall = self.backends.decode[decode_node], self.config.stall_timeout_s
        loop = asyncio.get_running_loop()

        def patient(silent_s: float) -> bool:
            """A silent stream waits on while its node is healthy and none of its streams relays
            (a node-wide pause: a long prefill on a colocated worker's shared model), at most
            STALL_PATIENCE stall timeouts; one that is silent alone, or on a node that missed its
            polls (frozen), is a failure."""
            quiet = loop.time() - decoder.last_token_at >= stall
            return decoder.healthy and quiet and silent_s < STALL_PATIENCE * stall

        try:
            async for event in within(call, first_s, stall, patient):
                kind = event.WhichOneof("kind")
                if first:  # Prefilled (a node older than it: its first token)
                    first = False
                    claim.prefilled()
                    if resumed and kind == "prefilled":
                        progress.resumed(event.prefilled, decision.node_id, decode_node)
                    elif not resumed:
                        progress.cached_tokens = event.prefilled.cached_tokens
                        self._routed(plan, decision, decode_node)
                        self.metrics.ttft.observe(time.perf_counter() - progress.start)
                        yield self._started(plan, decision, decode_node, len(progress.tried))
                if kind == "finished":
                    claim.release()  # before the client hears it: its next request sees the load as it is
                    yield generation_pb2.GenerateEvent(finished=progress.finished(plan, event.finished))
                elif kind == "text":
                    yield generation_pb2.GenerateEvent(text=event.text)
                elif kind == "token":
                    decoder.last_token_at = loop.time()
                    progress.sent(event.token.token_id)
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
                    "attempt": len(progress.tried),
                    "code": error.status,
                    "error": str(error)[:200],  # may quote client text
                },
            )
            if error.status in NO_RETRY:
                raise error from e
            if progress.ids:  # the client has tokens: the stream moves on (or says where it broke)
                raise _Broken(error, _reason(e, error), decode_node, decision.node_id) from e
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

    def _decode_call(
        self, plan: Plan, tokens: list[int], sent: int, where: tuple[str, str, float], timeout_s: float | None
    ) -> grpc.aio.UnaryStreamCall:  # type: ignore[type-arg]
        """`tokens`: the prompt, then (a migration) the `sent` tokens of output the client has;
        max_tokens less those, the same seed (the sampler draws token i from (seed, i) wherever it
        runs). where: (prefill node, decode node, how long the first token may take)."""
        prefill, decode, first_s = where
        params = dataclasses.replace(plan.params, max_tokens=plan.params.max_tokens - sent)
        request = decode_pb2.DecodeRequest(
            request_id=plan.request_id,
            tokens=tokens,
            prefill_node=prefill,
            params=params_to_pb(params),
            cache_salt=plan.salt,
            keep_kv=self.config.write_back,
            generated=sent,
            first_token_timeout_ms=int(first_s * 1000),
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
