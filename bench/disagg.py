"""Disaggregation benchmark: the same mixed workload on the same 2 cores, served by a colocated
worker (one process runs prefill and decode) and by a prefill node and a decode node pinned to a
core each. Prefill is compute-bound and long; decode steps are short and periodic: sharing cores,
each prefill stalls every running stream.

Workload (SmolLM2-135M-Instruct int4): 4 background streams (short prompts, 200 new tokens,
greedy, ignore_eos) start together; while they decode, 4 long requests arrive 1 s apart, each a
distinct 1,500-token prompt (cold: nothing cached) wanting 16 tokens. Reported: the background
streams' inter-token latency p50/p99, and the long requests' time to first token p50/p99, for each
setup, and disaggregated / colocated ratios (< 1: disaggregated is better). Threads: colocated 2
(both cores); disaggregated 1 per process, each process pinned to its own core.

  python bench/disagg.py [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import Stream, decode_stream, pct, spawn, stop, table, with_malloc_settings
from kvmesh.model.folder import ModelFolder
from kvmesh.model.prepare import default_model_dir
from kvmesh.model.tokenizer import ChatTokenizer, chat_messages
from kvmesh.v1 import decode_pb2, decode_pb2_grpc, stream_pb2

BACKGROUND, LONG, LONG_TOKENS, GAP_S = 4, 4, 16, 1.0
SIZES = {"background_tokens": 200, "long_prompt_tokens": 1500}


def _prompts() -> tuple[list[list[int]], list[list[int]]]:
    tok = ChatTokenizer(ModelFolder.load(default_model_dir("int4")))
    text = tok.encode((Path(__file__).resolve().parents[1] / "tests" / "data" / "english.txt").read_text())
    short = [tok.encode_chat(chat_messages(f"Tell story number {i} about a lighthouse.")) for i in range(BACKGROUND)]
    long = [
        [1000 + i, *(text * 4)[i * 11 : i * 11 + SIZES["long_prompt_tokens"] - 1]] for i in range(LONG)
    ]  # distinct from token 0
    return short, long


async def workload(decode: str, prefill: str, salt: bytes) -> tuple[list[Stream], list[Stream]]:
    short, long = _prompts()
    async with grpc.aio.insecure_channel(decode) as channel:
        stub = decode_pb2_grpc.DecodeStub(channel)

        def request(tokens: list[int], n: int) -> decode_pb2.DecodeRequest:
            params = stream_pb2.GenerationParams(max_tokens=n, ignore_eos=True)
            return decode_pb2.DecodeRequest(tokens=tokens, prefill_node=prefill, params=params, cache_salt=salt)

        background = [asyncio.create_task(decode_stream(stub, request(p, SIZES["background_tokens"]))) for p in short]
        await asyncio.sleep(0.5)
        arrivals = []
        for p in long:
            arrivals.append(asyncio.create_task(decode_stream(stub, request(p, LONG_TOKENS))))
            await asyncio.sleep(GAP_S)
        return list(await asyncio.gather(*background)), list(await asyncio.gather(*arrivals))


def _summary(name: str, background: list[Stream], long: list[Stream]) -> dict[str, Any]:
    failed = [s.error for s in background + long if s.error]
    if failed:
        raise RuntimeError(f"{name}: {len(failed)} streams failed: {failed[:3]}")
    gaps = [g * 1000 for s in background for g in s.gaps]
    ttfts = [s.ttft * 1000 for s in long]
    return {
        "setup": name,
        "itl_p50_ms": pct(gaps, 50),
        "itl_p99_ms": pct(gaps, 99),
        "itl_max_ms": max(gaps),
        "ttft_p50_ms": pct(ttfts, 50),
        "ttft_p99_ms": pct(ttfts, 99),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path)
    for name, value in SIZES.items():
        ap.add_argument("--" + name.replace("_", "-"), type=int, default=value)
    args = ap.parse_args()
    SIZES.update({name: getattr(args, name) for name in SIZES})
    with_malloc_settings()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        worker, wport = spawn(["worker", "--threads", "2", "--store", f"{tmp}/worker-store"])
        try:
            asyncio.run(workload(f"127.0.0.1:{wport}", "", b"warm-up"))  # loads kernels; distinct salts keep it cold
            results.append(_summary("colocated", *asyncio.run(workload(f"127.0.0.1:{wport}", "", b"run"))))
        finally:
            stop(worker)
        prefill, pport = spawn(["prefill", "--threads", "1", "--store", f"{tmp}/prefill-store"], cores={0})
        decode, dport = spawn(["decode", "--threads", "1"], cores={1})
        try:
            target = (f"127.0.0.1:{dport}", f"127.0.0.1:{pport}")
            asyncio.run(workload(*target, b"warm-up"))
            results.append(_summary("disaggregated", *asyncio.run(workload(*target, b"run"))))
        finally:
            stop(prefill, decode)
    keys = ["itl_p50_ms", "itl_p99_ms", "itl_max_ms", "ttft_p50_ms", "ttft_p99_ms"]
    ratio = {k: results[1][k] / results[0][k] for k in keys}
    table(
        ["setup", *keys], [[r["setup"], *(r[k] for k in keys)] for r in results] + [["disagg/coloc", *ratio.values()]]
    )
    if args.json:
        args.json.write_text(json.dumps({"results": results, "disagg_over_colocated": ratio}, indent=2) + "\n")


if __name__ == "__main__":
    main()
