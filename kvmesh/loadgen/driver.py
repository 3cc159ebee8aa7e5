"""Drives a workload against one endpoint: every session a task (open loop: at its start time;
closed loop: `concurrency` users taking sessions in turn), each turn streamed and timed at the
client. The conversation grows with the model's own replies, as a chat client's would."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from kvmesh.client import AsyncClient
from kvmesh.errors import KvmeshError
from kvmesh.loadgen.workload import Session, Workload

REQUEST_TIMEOUT_S = 600.0


@dataclass
class Result:
    """One request as the client saw it; times in seconds from the start of the run."""

    session_id: str
    turn: int
    sent_s: float
    ttft_s: float = 0.0  # sent -> first token
    done_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)  # gaps between successive tokens
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    prefill_node: str = ""
    decode_node: str = ""
    prefill_compute_ms: float = 0.0  # the model's time on the uncached tokens, as the node measured it
    decode_ms: float = 0.0  # KV whole -> last token, at the decode node
    error: str = ""


async def timed_turn(
    client: AsyncClient, session_id: str, messages: list[dict[str, str]], turn: int, t0: float, **params: Any
) -> tuple[Result, str]:
    """One chat turn through the proxy, timed at the client. -> its Result and the reply's text."""
    result = Result(session_id, turn, time.perf_counter() - t0)
    text, last = "", 0.0
    try:
        async for event in client.generate(messages, session_id=session_id, timeout=REQUEST_TIMEOUT_S, **params):
            now = time.perf_counter() - t0
            kind = event.WhichOneof("kind")
            if kind == "started":
                result.prefill_node, result.decode_node = event.started.prefill_node, event.started.decode_node
            elif kind == "token":
                if not result.ttft_s:
                    result.ttft_s = now - result.sent_s
                else:
                    result.itl_s.append(now - last)
                last = now
                text += event.token.text
            elif kind == "text":
                text += event.text.text
            elif kind == "finished":
                usage = event.finished.usage
                result.prompt_tokens, result.cached_tokens = usage.prompt_tokens, usage.cached_tokens
                result.completion_tokens = usage.completion_tokens
                result.prefill_compute_ms = event.finished.timings.prefill_compute_ms
                result.decode_ms = event.finished.timings.decode_ms
    except KvmeshError as e:
        result.error = e.status
    result.done_s = time.perf_counter() - t0
    return result, text


async def _session(
    client: AsyncClient, workload: Workload, session: Session, t0: float, out: list[Result], bar: tqdm[Any]
) -> None:
    system = workload.systems[session.app]
    messages = [{"role": "system", "content": system}] if system else []
    for i, turn in enumerate(session.turns):
        await asyncio.sleep(turn.think_s)
        messages.append({"role": "user", "content": turn.user})
        result, reply = await timed_turn(
            client, session.session_id, messages, i, t0, max_tokens=workload.spec.max_tokens
        )
        out.append(result)
        bar.update(1)
        if result.error:
            messages.pop()  # the user asks again next turn, as after a failed send
            continue
        messages.append({"role": "assistant", "content": reply})


async def run(endpoint: str, workload: Workload, label: str = "", progress: bool = True) -> list[Result]:
    """Every session of the workload against `endpoint`; -> one Result per request."""
    client = AsyncClient(endpoint)
    results: list[Result] = []
    spec = workload.spec
    with tqdm(total=workload.requests, desc=label or endpoint, unit="req", disable=not progress, leave=False) as bar:
        t0 = time.perf_counter()
        if spec.closed_loop:
            queue: asyncio.Queue[Session] = asyncio.Queue()
            for s in workload.sessions:
                queue.put_nowait(s)

            async def user() -> None:
                while not queue.empty():
                    await _session(client, workload, queue.get_nowait(), t0, results, bar)

            await asyncio.gather(*(user() for _ in range(spec.concurrency)))
        else:

            async def arriving(s: Session) -> None:
                await asyncio.sleep(s.start_s)
                await _session(client, workload, s, t0, results, bar)

            await asyncio.gather(*(arriving(s) for s in workload.sessions))
    await client.close()
    return sorted(results, key=lambda r: r.sent_s)
