"""Proxy overhead benchmark: the latency the proxy adds to the first token and to every token
event, against calling the decode node directly, in the same run; and what its OpenAI HTTP front
door (server-sent events) adds over its gRPC one (the HTTP client a bare asyncio connection, as
lean as grpc.aio's C core: httpx added ~7 ms of its own to every first token).

Workload: SmolLM2-135M-Instruct int4; a prefill node, a decode node and the proxy as processes
(1 thread each), the same chat prompt every time (so prefill is a cache hit and cheap), 64 new
tokens (greedy, ignore_eos); --requests calls each way, alternating direct (Decode on the decode
node, naming the prefill node) and through the proxy (Generate): time to first token both ways.
Per token event: a direct call and a proxied one run at once, in the same decode batch, so each
step emits a token to both at the same instant; pairing the two streams by step (the lag in steps
that makes arrivals closest), the proxied arrival minus the direct one is the latency the proxy
adds to that event. The HTTP front door the same way against gRPC Generate: TTFT of alternating
calls, per-event delays of an SSE stream paired with a gRPC one in the same batch; then
--concurrent SSE streams at once (64; the decode node has 64 slots): all must complete.

  python bench/proxy.py [--requests 30] [--concurrent 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import Stream, decode_stream, free_port, pct, spawn, stop, table, window_rate, with_malloc_settings
from kvmesh.client import request as generate_request
from kvmesh.model.folder import ModelFolder
from kvmesh.model.prepare import default_model_dir
from kvmesh.model.tokenizer import ChatTokenizer, chat_messages
from kvmesh.v1 import decode_pb2, decode_pb2_grpc, generation_pb2_grpc, stream_pb2

SIZES = {"new_tokens": 64}
QUESTION = "Describe a lighthouse at night."


class _Proxied:
    """Generation.Generate behind the same `Decode(request)` call shape as the decode node."""

    def __init__(self, stub: generation_pb2_grpc.GenerationStub) -> None:
        self.stub = stub

    def Decode(self, request: object, timeout: float | None = None) -> object:
        return self.stub.Generate(request, timeout=timeout)


async def run(
    proxy: str, decode: str, prefill: str, n: int
) -> tuple[list[Stream], list[Stream], list[tuple[Stream, Stream]]]:
    tok = ChatTokenizer(ModelFolder.load(default_model_dir("int4")))
    tokens = tok.encode_chat(chat_messages(QUESTION))
    params = stream_pb2.GenerationParams(max_tokens=SIZES["new_tokens"], ignore_eos=True)
    direct_req = decode_pb2.DecodeRequest(tokens=tokens, prefill_node=prefill, params=params)
    proxy_req = generate_request(chat_messages(QUESTION), "", "bench", max_tokens=SIZES["new_tokens"], ignore_eos=True)
    async with grpc.aio.insecure_channel(decode) as dch, grpc.aio.insecure_channel(proxy) as pch:
        direct_stub, proxied = decode_pb2_grpc.DecodeStub(dch), _Proxied(generation_pb2_grpc.GenerationStub(pch))
        return await _alternate(
            lambda: decode_stream(direct_stub, direct_req), lambda: decode_stream(proxied, proxy_req), n
        )


async def _alternate(
    a: Callable[[], Awaitable[Stream]], b: Callable[[], Awaitable[Stream]], n: int
) -> tuple[list[Stream], list[Stream], list[tuple[Stream, Stream]]]:
    """3 warm-up rounds (the prompt cached, everything connected), then n calls each way
    alternating, then pairs run at once (in one decode batch)."""
    for _ in range(3):
        await a()
        await b()
    firsts, seconds, pairs = [], [], []
    for _ in range(n):
        firsts.append(await a())
        seconds.append(await b())
    for _ in range(max(n // 3, 3)):
        first, second = await asyncio.gather(a(), b())
        pairs.append((first, second))
    return firsts, seconds, pairs


async def sse_stream(port: int, body: dict[str, object]) -> Stream:
    """One streamed chat completion over a bare HTTP/1.1 connection (asyncio streams: a Python
    HTTP client such as httpx adds milliseconds of its own per request, more than the front door
    is to be measured at); an arrival per server-sent event that carries text."""
    payload = json.dumps(body).encode()
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\n"
        f"content-length: {len(payload)}\r\nconnection: close\r\n\r\n"
    )
    s = Stream(time.perf_counter())
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(head.encode() + payload)
        status, buffer = b"", b""
        while data := await reader.read(65536):
            buffer += data
            status = status or buffer[9:12]
            *events, buffer = buffer.split(b"\n\n")  # chunked framing lines do not matter here
            now = time.perf_counter()
            s.arrivals += [now for e in events if b'"content":"' in e and b'"content":""' not in e]
        writer.close()
        if status != b"200":
            s.error = f"HTTP {status.decode(errors='replace')}"
    except OSError as e:
        s.error = type(e).__name__
    return s


async def run_http(proxy: str, port: int, n: int, concurrent: int) -> dict[str, object]:
    """gRPC Generate against the HTTP front door, alternating; paired in one batch; then many SSE."""
    body = {
        "model": "smollm2-135m-instruct",
        "messages": chat_messages(QUESTION),
        "max_tokens": SIZES["new_tokens"],
        "temperature": 0,
        "stream": True,
    }
    # greedy and the same prompt both ways, to EOS as an OpenAI client gets it (no ignore_eos there)
    grpc_req = generate_request(chat_messages(QUESTION), "", "bench", max_tokens=SIZES["new_tokens"])
    body["model"] = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"][0]["id"]
    http = port
    async with grpc.aio.insecure_channel(proxy) as pch:
        proxied = _Proxied(generation_pb2_grpc.GenerationStub(pch))
        via_grpc, via_http, pairs = await _alternate(
            lambda: decode_stream(proxied, grpc_req), lambda: sse_stream(http, body), n
        )
        many = await asyncio.gather(*(sse_stream(http, body) for _ in range(concurrent)))
    return {"grpc": via_grpc, "http": via_http, "pairs": pairs, "many": many}


def event_delays(pairs: list[tuple[Stream, Stream]]) -> list[float]:
    """Per token event, proxied arrival - direct arrival of the token emitted in the same step."""
    delays = []
    for d, p in pairs:
        a, b = d.arrivals[1:], p.arrivals[1:]  # decode steps only (first tokens come from prefill)
        lag = min(range(-12, 13), key=lambda j: statistics.median(abs(x) for x in _diffs(a, b, j)))
        delays += [x * 1000 for x in _diffs(a, b, lag)]
    return delays


def _diffs(a: list[float], b: list[float], lag: int) -> list[float]:
    return [b[i] - a[i + lag] for i in range(len(b)) if 0 <= i + lag < len(a)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=30)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--new-tokens", type=int, default=SIZES["new_tokens"])
    ap.add_argument("--concurrent", type=int, default=64, help="SSE streams at once")
    args = ap.parse_args()
    SIZES["new_tokens"] = args.new_tokens
    with_malloc_settings()
    with tempfile.TemporaryDirectory() as tmp:
        prefill, pport = spawn(["prefill", "--threads", "1", "--store", f"{tmp}/store"])
        slots = str(max(args.concurrent, 16))
        decode, dport = spawn(["decode", "--threads", "1", "--slots", slots, "--warm-tokens", "128"])
        pre, dec = f"127.0.0.1:{pport}", f"127.0.0.1:{dport}"
        hport = free_port()
        proxy, xport = spawn(["proxy", "--prefill", pre, "--decode", dec, "--http-port", str(hport)])
        try:
            direct, through, pairs = asyncio.run(run(f"127.0.0.1:{xport}", dec, pre, args.requests))
            http = asyncio.run(run_http(f"127.0.0.1:{xport}", hport, args.requests, args.concurrent))
        finally:
            stop(proxy, prefill, decode)
    failed = [s.error for s in direct + through + [x for p in pairs for x in p] if s.error]
    if failed:
        raise RuntimeError(f"{len(failed)} calls failed: {failed[:3]}")

    added = event_delays(pairs)
    ttft_d, ttft_p = [s.ttft * 1000 for s in direct], [s.ttft * 1000 for s in through]
    report = {
        "workload": {"requests": args.requests, "new_tokens": SIZES["new_tokens"], "paired_events": len(added)},
        "ttft_direct_p50_ms": pct(ttft_d, 50),
        "ttft_proxy_p50_ms": pct(ttft_p, 50),
        "ttft_direct_p99_ms": pct(ttft_d, 99),
        "ttft_proxy_p99_ms": pct(ttft_p, 99),
        "added_per_event_p50_ms": pct(added, 50),
        "added_per_event_p99_ms": pct(added, 99),
    }
    table(
        ["metric", "direct", "through proxy", "added"],
        [
            _row("first token p50 ms", report, "ttft_direct_p50_ms", "ttft_proxy_p50_ms"),
            _row("first token p99 ms", report, "ttft_direct_p99_ms", "ttft_proxy_p99_ms"),
            ["token event p50 ms (added)", "", "", report["added_per_event_p50_ms"]],
            ["token event p99 ms (added)", "", "", report["added_per_event_p99_ms"]],
        ],
    )
    print("target: <= 1 ms added per token event at p50")
    report["http"] = http_report(http)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


def _row(name: str, figures: dict[str, Any], base: str, other: str) -> list[object]:
    return [name, figures[base], figures[other], figures[other] - figures[base]]


def http_report(http: dict[str, Any]) -> dict[str, Any]:
    """The HTTP front door against gRPC Generate (both through the proxy)."""
    failed = [s.error for key in ("grpc", "http") for s in http[key] if s.error]
    failed += [s.error for p in http["pairs"] for s in p if s.error]
    if failed:
        raise RuntimeError(f"{len(failed)} calls failed: {failed[:3]}")
    ttft_g, ttft_h = [s.ttft * 1000 for s in http["grpc"]], [s.ttft * 1000 for s in http["http"]]
    added = event_delays(http["pairs"])
    gaps_g = [g * 1000 for s in http["grpc"] for g in s.gaps]
    gaps_h = [g * 1000 for s in http["http"] for g in s.gaps]
    many = http["many"]
    errors = [s.error for s in many if s.error]
    out = {
        "ttft_grpc_p50_ms": pct(ttft_g, 50),
        "ttft_http_p50_ms": pct(ttft_h, 50),
        "ttft_grpc_p99_ms": pct(ttft_g, 99),
        "ttft_http_p99_ms": pct(ttft_h, 99),
        "gap_grpc_p50_ms": pct(gaps_g, 50),
        "gap_http_p50_ms": pct(gaps_h, 50),
        "gap_grpc_p99_ms": pct(gaps_g, 99),
        "gap_http_p99_ms": pct(gaps_h, 99),
        "added_per_event_p50_ms": pct(added, 50),
        "added_per_event_p99_ms": pct(added, 99),
        "concurrent": len(many),
        "concurrent_errors": len(errors),
        "concurrent_tok_s": window_rate([s for s in many if not s.error]),
        "concurrent_gap_p50_ms": pct([g * 1000 for s in many for g in s.gaps], 50),
        "concurrent_gap_p99_ms": pct([g * 1000 for s in many for g in s.gaps], 99),
    }
    print("\nOpenAI HTTP front door (SSE) against gRPC Generate, both through the proxy")
    table(
        ["metric", "gRPC", "HTTP", "HTTP - gRPC"],
        [
            _row(f"{name} {q} ms", out, f"{key}_grpc_{q}_ms", f"{key}_http_{q}_ms")
            for key, name in (("ttft", "first token"), ("gap", "inter-token gap"))
            for q in ("p50", "p99")
        ]
        + [
            ["token event, paired, p50 ms (added)", "", "", out["added_per_event_p50_ms"]],
            ["token event, paired, p99 ms (added)", "", "", out["added_per_event_p99_ms"]],
        ],
    )
    print(
        f"{out['concurrent']} SSE streams at once: {out['concurrent_errors']} errors, "
        f"{out['concurrent_tok_s']:.0f} tok/s in all, gap p50 {out['concurrent_gap_p50_ms']:.1f} ms, "
        f"p99 {out['concurrent_gap_p99_ms']:.1f} ms"
    )
    print("targets: HTTP adds <= 1 ms to TTFT p50 and <= 0.2 ms to the gap p50; the concurrent streams: no errors")
    return out


if __name__ == "__main__":
    main()
