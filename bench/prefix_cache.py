"""Prefix-cache benchmark: a prefill node over loopback gRPC, cold vs warm, and its KV stream
against a raw gRPC byte stream of the same size.

Workload: SmolLM2-135M-Instruct int4, 2 threads, block 16. A 2,000-token system prompt (English
prose) + a 200-token user message (a different one per request).
  cold   the store has nothing for this prompt (each cold request uses a fresh cache salt)
  warm   the system prompt's blocks are stored (stored once, then new user messages)
  TTFT   request sent -> header (with the first token) received, at the client
  stream request sent -> whole KV received, checksummed and handed out as per-layer arrays
  raw    as many messages of the same size from a bare gRPC server (no model, no checksum, no
         copy), received on the same client stack, right after each warm stream
Servers and this client run with DESIGN.md's malloc settings (glibc otherwise returns each freed
MiB to the OS and faults it in again). The client receives as a decode node does (grpc.aio,
kv_transfer.wire.pull: each chunk checked, and taken in place as its layer's array; the decode
node's one copy is into its batch slot). After each
request the client waits until the node's store writer is idle. Medians over --rounds; the
per-run TTFT, store read and compute times (from the KV header) go to stderr.

--model takes another folder (one prepared with --activations float16 keeps float16 KV: its own
stream is then the float16 one).

  python bench/prefix_cache.py [--rounds 3] [--model DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import MALLOC, spawn, stop, with_malloc_settings  # noqa: E402
from kv_transfer.codec import CHUNK_BYTES  # noqa: E402
from kv_transfer.wire import prefill_method, pull, read_header  # noqa: E402
from kvmesh import aio  # noqa: E402
from kvmesh.model.folder import ModelFolder  # noqa: E402
from kvmesh.model.prepare import default_model_dir  # noqa: E402
from kvmesh.model.tokenizer import ChatTokenizer  # noqa: E402
from kvmesh.v1 import kv_pb2, prefill_pb2, prefill_pb2_grpc  # noqa: E402

SIZES = {"system_tokens": 2000, "user_tokens": 200}
RAW_METHOD = "/bench.Raw/Stream"
LOOP = asyncio.new_event_loop()


async def raw_server(port_file: Path) -> None:
    """A bare gRPC server on the same stack as the services (grpc.aio on uvloop): request
    'N,SIZE' -> N messages of SIZE bytes (one payload object, sent again and again)."""

    async def stream(request: bytes, context: object) -> Any:
        n, size = (int(x) for x in request.decode().split(","))
        payload = os.urandom(size)
        for _ in range(n):
            yield payload

    handler = grpc.method_handlers_generic_handler(
        "bench.Raw", {"Stream": grpc.unary_stream_rpc_method_handler(stream)}
    )
    server = grpc.aio.server(options=[("grpc.max_send_message_length", 64 << 20)])
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    port_file.write_text(str(port))
    await server.wait_for_termination()


def _prompts(folder: Path, rounds: int) -> tuple[list[int], list[list[int]]]:
    tok = ChatTokenizer(ModelFolder.load(folder))
    text = tok.encode((ROOT / "tests" / "data" / "english.txt").read_text())
    system = (text * 5)[: SIZES["system_tokens"]]
    users = [(text * 2)[i * 37 : i * 37 + SIZES["user_tokens"]] for i in range(2 * rounds + 2)]
    return system, users


def _prefill(channel: grpc.aio.Channel, tokens: list[int], salt: bytes, dtype: int = 0) -> dict[str, float]:
    """One request, received as a decode node does (kv_transfer.wire.pull); then waits until the
    node's store writer is idle, so requests do not overlap the previous one's background writes."""

    async def run() -> dict[str, float]:
        start = time.perf_counter()
        call = prefill_method(channel)(prefill_pb2.PrefillRequest(tokens=tokens, cache_salt=salt, wire_dtype=dtype))
        it = aiter(call)
        header = await read_header(it)
        ttft = time.perf_counter() - start
        got = await pull(it, header)
        total = time.perf_counter() - start
        load = prefill_pb2_grpc.PrefillStub(channel).GetLoad
        while (await load(prefill_pb2.GetLoadRequest())).store_writes_pending:
            await asyncio.sleep(0.05)
        h = got.header
        return {
            "ttft_s": ttft,
            "stream_s": total - ttft,
            "bytes": h.total_bytes,
            "chunks": h.chunk_count,
            "cached": h.cached_tokens,
            "read_ms": h.store_read_ms,
            "compute_ms": h.compute_ms,
            "fp16": float(h.layout.dtype == kv_pb2.KV_DTYPE_FLOAT16),
        }

    return LOOP.run_until_complete(run())


def _in_loop(make: Any, *args: Any) -> Any:
    async def build() -> Any:
        return make(*args)

    return LOOP.run_until_complete(build())


def _raw(channel: grpc.aio.Channel, n: int, size: int) -> float:
    """Seconds to receive n messages of size bytes, on the client stack the KV stream uses."""

    async def run() -> float:
        call = channel.unary_stream(RAW_METHOD, request_serializer=None, response_deserializer=None)
        start = time.perf_counter()
        async for _ in call(f"{n},{size}".encode()):
            pass
        return time.perf_counter() - start

    return float(LOOP.run_until_complete(run()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--model", type=Path, help="model folder (default: the prepared SmolLM2 int4)")
    ap.add_argument("--chunk-bytes", type=int, default=CHUNK_BYTES, help="the prefill node's KV chunk size")
    ap.add_argument("--raw-server", type=Path, help=argparse.SUPPRESS)
    for name, value in SIZES.items():
        ap.add_argument("--" + name.replace("_", "-"), type=int, default=value)
    args = ap.parse_args()
    SIZES.update({name: getattr(args, name) for name in SIZES})
    if args.raw_server:
        aio.run(raw_server(args.raw_server))
        return
    with_malloc_settings()
    folder = args.model or default_model_dir("int4")
    system, users = _prompts(folder, args.rounds)
    with tempfile.TemporaryDirectory() as tmp:
        args_ = ["prefill", "--store", f"{tmp}/store", "--model", str(folder), "--threads", "2"]
        node, port = spawn([*args_, "--chunk-bytes", str(args.chunk_bytes)])
        raw_port_file = Path(tmp) / "raw.port"
        raw = subprocess.Popen(
            [sys.executable, __file__, "--raw-server", str(raw_port_file)], env={**os.environ, **MALLOC}
        )
        try:
            report = _measure(
                _in_loop(grpc.aio.insecure_channel, f"127.0.0.1:{port}"),
                raw_port_file,
                system,
                users,
                args.rounds,
            )
        finally:
            raw.terminate()
            stop(node, raw)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


def _measure(
    channel: grpc.aio.Channel, raw_port_file: Path, system: list[int], users: list[list[int]], rounds: int
) -> dict[str, Any]:
    _prefill(channel, users[-1], b"warm-up")  # loads the session's kernels
    _prefill(channel, [*system, *users[-2]], b"warm")  # stores the system prompt's blocks
    runs: dict[str, list[dict[str, float]]] = {"cold": [], "warm": [], "warm_fp16": []}
    while not raw_port_file.exists():
        time.sleep(0.1)
    raw_channel = _in_loop(grpc.aio.insecure_channel, f"127.0.0.1:{raw_port_file.read_text()}")
    raw_runs: list[float] = []
    for r in range(rounds):
        runs["cold"].append(_prefill(channel, [*system, *users[r]], f"cold-{r}".encode()))
        runs["warm"].append(_prefill(channel, [*system, *users[r]], b"warm"))
        # The baseline right after the stream it is compared with: as many messages, as big.
        total, count = int(runs["warm"][r]["bytes"]), int(runs["warm"][r]["chunks"])
        raw_runs.append(_raw(raw_channel, count, total // count))
        runs["warm_fp16"].append(_prefill(channel, [*system, *users[rounds + r]], b"warm", kv_pb2.KV_DTYPE_FLOAT16))
    raw_s = statistics.median(raw_runs)
    kv_over_raw = statistics.median(raw / run["stream_s"] for raw, run in zip(raw_runs, runs["warm"], strict=True))

    def med(kind: str, key: str) -> float:
        return statistics.median(run[key] for run in runs[kind])

    for kind, rs in runs.items():
        phases = [(round(r["ttft_s"] * 1000), round(r["read_ms"]), round(r["compute_ms"])) for r in rs]
        print(f"{kind}: (TTFT, store read, compute) ms {phases}", file=sys.stderr)
    ttft_cold, ttft_warm = med("cold", "ttft_s"), med("warm", "ttft_s")
    kv_s, kv16_s = med("warm", "stream_s"), med("warm_fp16", "stream_s")
    dtype = "fp16" if runs["warm"][0]["fp16"] else "fp32"
    report = {
        "workload": {
            "system_tokens": SIZES["system_tokens"],
            "user_tokens": SIZES["user_tokens"],
            "rounds": rounds,
            "kv_bytes": total,
        },
        "ttft_cold_ms": ttft_cold * 1000,
        "ttft_warm_ms": ttft_warm * 1000,
        "warm_over_cold": ttft_warm / ttft_cold,
        "cached_tokens_warm": med("warm", "cached"),
        "kv_stream_mb_s": total / kv_s / 1e6,
        "raw_stream_mb_s": total / raw_s / 1e6,
        "kv_over_raw": kv_over_raw,
        "kv_dtype": dtype,
        "kv_stream_ms": kv_s * 1000,
        "kv_stream_fp16_ms": kv16_s * 1000,
    }
    rows = [
        ("TTFT cold (ms)", report["ttft_cold_ms"], ""),
        ("TTFT warm (ms)", report["ttft_warm_ms"], ""),
        ("warm / cold", report["warm_over_cold"], "target <= 0.12"),
        ("cached tokens (warm)", report["cached_tokens_warm"], f"of {SIZES['system_tokens'] + SIZES['user_tokens']}"),
        ("KV stream (MB/s)", report["kv_stream_mb_s"], f"{total / 1e6:.1f} MB {dtype}"),
        ("raw gRPC stream (MB/s)", report["raw_stream_mb_s"], f"same bytes, {count} messages"),
        ("KV / raw", report["kv_over_raw"], "median of per-round ratios; target >= 0.8"),
        (f"KV stream {dtype} (ms)", report["kv_stream_ms"], "the model's own KV type"),
        ("KV stream, fp16 asked (ms)", report["kv_stream_fp16_ms"], "float16 on the wire"),
    ]
    print(f"{'metric':26} {'value':>10}  note")
    for name, value, note in rows:
        print(f"{name:26} {value:10.3f}  {note}")
    return report


if __name__ == "__main__":
    main()
