"""Decode benchmark: aggregate decode tokens/s of one decode node at 1, 4, 8 and 16 concurrent
streams, as a ratio to 1 stream, with inter-token latency p50/p99.

Workload: SmolLM2-135M-Instruct int4, 2 threads, a prefill node and a decode node as processes
(malloc settings of DESIGN.md). Each stream: a 512-token prompt (a shared 496-token prefix, cached
after the first request, + 16 tokens of its own), 128 new tokens (greedy, ignore_eos). Streams of a
round start together; aggregate tokens/s = tokens received while all N streams decode (from the
moment the last stream got its second token to the moment the first one finished) / that time.
Inter-token latency = gaps between a stream's tokens at the client. One warm-up, then --rounds
rounds of every concurrency; medians, and "x 1 stream" pairs each round with its own 1 stream.
Two decode nodes share the prefill node, one per decode numerics (--numerics): the default
(int8 activations) and exact (fp32 activations, --decode-numerics exact), each concurrency on both in turn.
--model takes another folder, e.g. one prepared with --exact-decode.

Then the batch budget, in this process, without services: the engine's step alone (SlotBatch,
N sequences of prompt-tokens each) and the attention alone (the graph's GroupQueryAttention
nodes over the same KV), so "rest" is the weights' side (MatMulNBits, Q4_1 corrections, norms);
what N streams could reach over one without attention, and with attention at the machine's read
bandwidth (KV bytes / bandwidth), bounds the "x 1 stream" above.

  python bench/decode.py [--concurrency 1 4 8 16] [--rounds 3] [--model DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import decode_stream, pct, spawn, stop, table, window_rate, with_malloc_settings
from kvmesh.model.folder import ModelFolder
from kvmesh.model.prepare import default_model_dir
from kvmesh.model.tokenizer import ChatTokenizer
from kvmesh.v1 import decode_pb2, decode_pb2_grpc, stream_pb2

SIZES = {"prompt_tokens": 512, "shared_tokens": 496, "new_tokens": 128}
MODEL = [default_model_dir("int4")]
# decode node flags per numerics: the folder's default (int8 activations), and exact (fp32)
NUMERICS = {"default": [], "exact": ["--decode-numerics", "exact"]}


def prompts(n: int) -> list[list[int]]:
    tok = ChatTokenizer(ModelFolder.load(MODEL[0]))
    text = tok.encode((Path(__file__).resolve().parents[1] / "tests" / "data" / "english.txt").read_text())
    shared = (text * 2)[: SIZES["shared_tokens"]]
    return [[*shared, *text[7 * i : 7 * i + SIZES["prompt_tokens"] - SIZES["shared_tokens"]]] for i in range(n)]


async def round_(decode: str, prefill: str, n: int) -> dict[str, Any]:
    async with grpc.aio.insecure_channel(decode) as channel:
        stub = decode_pb2_grpc.DecodeStub(channel)
        params = stream_pb2.GenerationParams(max_tokens=SIZES["new_tokens"], ignore_eos=True)
        requests = [decode_pb2.DecodeRequest(tokens=p, prefill_node=prefill, params=params) for p in prompts(n)]
        streams = await asyncio.gather(*(decode_stream(stub, r) for r in requests))
    errors = [s.error for s in streams if s.error]
    if errors:
        raise RuntimeError(f"{len(errors)} streams failed: {errors[:3]}")
    # Steady state: from the moment every stream is decoding to the moment the first one ends.
    return {"tokens_per_s": window_rate(streams), "gaps_ms": [g * 1000 for s in streams for g in s.gaps]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--rounds", type=int, default=3, help="each concurrency once per round; medians")
    ap.add_argument("--numerics", nargs="+", choices=NUMERICS, default=list(NUMERICS), help="decode nodes to run")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--model", type=Path, help="model folder (default: the prepared SmolLM2 int4)")
    for name, value in SIZES.items():
        ap.add_argument("--" + name.replace("_", "-"), type=int, default=value)
    args = ap.parse_args()
    SIZES.update({name: getattr(args, name) for name in SIZES})
    with_malloc_settings()
    MODEL[0] = args.model or MODEL[0]
    runs = measure(args)
    rows = []
    for numerics in args.numerics:
        bases = [run[numerics, args.concurrency[0]]["tokens_per_s"] for run in runs]
        for n in args.concurrency:
            mine = [run[numerics, n] for run in runs]
            gaps = [g for r in mine for g in r["gaps_ms"]]
            ratios = [r["tokens_per_s"] / base for r, base in zip(mine, bases, strict=True)]
            rows.append(
                {
                    "numerics": numerics,
                    "streams": n,
                    "tokens_per_s": statistics.median(r["tokens_per_s"] for r in mine),
                    "ratio_to_1": statistics.median(ratios),
                    "itl_p50_ms": pct(gaps, 50),
                    "itl_p99_ms": pct(gaps, 99),
                    "rounds": [r["tokens_per_s"] for r in mine],
                }
            )
    keys = ["numerics", "streams", "tokens_per_s", "ratio_to_1", "itl_p50_ms", "itl_p99_ms"]
    table(
        ["numerics", "streams", "tokens/s", "x 1 stream", "ITL p50 ms", "ITL p99 ms"],
        [[r[k] for k in keys] for r in rows],
    )
    report: dict[str, Any] = {"workload": dict(SIZES), "rows": rows, "budget": batch_budget(args)}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


def batch_budget(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The engine's step and its attention at each concurrency, and what bounds "x 1 stream"."""
    from bench.budget import attention_ms, batch_step_ms, kv_bytes_per_token, read_bandwidth

    folder, context = ModelFolder.load(MODEL[0]), SIZES["prompt_tokens"]
    bandwidth, kv_per_token = read_bandwidth(), kv_bytes_per_token(MODEL[0])
    rows: list[dict[str, Any]] = []
    for numerics in args.numerics:
        exact = numerics == "exact"
        graph = folder.graph if exact or folder.decode_graph is None else folder.decode_graph
        for n in args.concurrency:
            step = batch_step_ms(MODEL[0], n, context, exact)
            attention = attention_ms(graph, n, context)
            kv_ms = n * context * kv_per_token / bandwidth * 1000
            rows.append(
                {
                    "numerics": numerics,
                    "streams": n,
                    "step_ms": step,
                    "attention_ms": attention,
                    "rest_ms": step - attention,
                    "kv_at_bandwidth_ms": kv_ms,
                }
            )
    for r in rows:
        one = next(o for o in rows if o["numerics"] == r["numerics"] and o["streams"] == args.concurrency[0])
        n = r["streams"] / one["streams"]
        r["ratio_to_1"] = n * one["step_ms"] / r["step_ms"]
        r["ratio_without_attention"] = n * one["rest_ms"] / r["rest_ms"]
        r["ratio_attention_at_bandwidth"] = (
            n * (one["rest_ms"] + one["kv_at_bandwidth_ms"]) / (r["rest_ms"] + r["kv_at_bandwidth_ms"])
        )
    print(f"\nbatch budget: engine alone, {context} tokens per sequence, read bandwidth {bandwidth / 1e9:.1f} GB/s")
    keys = [
        "numerics",
        "streams",
        "step_ms",
        "attention_ms",
        "rest_ms",
        "kv_at_bandwidth_ms",
        "ratio_to_1",
        "ratio_without_attention",
        "ratio_attention_at_bandwidth",
    ]
    table(
        [
            "numerics",
            "streams",
            "step ms",
            "attention ms",
            "rest ms",
            "KV/bandwidth ms",
            "x 1 stream",
            "x 1, no attention",
            "x 1, attention at bandwidth",
        ],
        [[r[k] for k in keys] for r in rows],
    )
    return rows


def measure(args: argparse.Namespace) -> list[dict[tuple[str, int], dict[str, Any]]]:
    """One prefill node, one decode node per numerics; every (numerics, concurrency) once per round."""
    with tempfile.TemporaryDirectory() as tmp:
        model = ["--model", str(MODEL[0])]
        prefill, pport = spawn(["prefill", *model, "--store", f"{tmp}/store", "--threads", "2"])
        slots = ["--slots", str(max(args.concurrency)), "--slot-tokens", "1024"]
        decodes = {n: spawn(["decode", *model, "--threads", "2", *slots, *NUMERICS[n]]) for n in args.numerics}
        try:
            targets = {n: (f"127.0.0.1:{port}", f"127.0.0.1:{pport}") for n, (_, port) in decodes.items()}
            for target in targets.values():
                asyncio.run(round_(*target, 2))  # warm-up: caches the shared prefix, loads kernels
            # Every concurrency once per round, rounds repeated: a ratio pairs N streams with the
            # first concurrency of the same round (this machine drifts within minutes).
            runs: list[dict[tuple[str, int], dict[str, Any]]] = []
            for r in range(args.rounds):
                run: dict[tuple[str, int], dict[str, Any]] = {}
                runs.append(run)
                for n in args.concurrency:
                    for numerics, target in targets.items():
                        run[numerics, n] = res = asyncio.run(round_(*target, n))
                        print(f"round {r}: {numerics} {n} streams {res['tokens_per_s']:.1f} tokens/s", file=sys.stderr)
        finally:
            stop(prefill, *(p for p, _ in decodes.values()))
    return runs


if __name__ == "__main__":
    main()
