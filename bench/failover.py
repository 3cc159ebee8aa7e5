"""Failover: streams that survive node loss, and what the block-by-block write-back costs.

Workload: a local cluster of --prefill (2) prefill and --decode (2) decode nodes on a fresh
KVMESH_HOME each run; --streams (16) concurrent requests through the proxy, each a different
--prompt-tokens (128) prompt, --tokens (256) tokens (EOS ignored), seeded temperature 0.8 /
top-p 0.95 sampling (seed = the stream's number). Runs, in this order:

  undisturbed         migration on, write-back on: the reference token ids of every stream
  write-back off      undisturbed, the decode nodes write nothing back: the write-back's cost
                      (these two --rounds (2) times, their order alternating; the ratio: the
                      median of the rounds')
  kill, migration on  decode-0 SIGKILLed once the streams have --kill-at (1/4) of their tokens on
                      average, prefill-0 once they have half
  kill, migration off the same with --migration-limit 0 (today's behaviour before #17)

Per run: streams completed; streams whose token ids differ from the undisturbed run's; aggregate
tokens/s while every stream decodes (the undisturbed runs: write-back on / off is the ratio); for
the moved streams the longest inter-token gap each saw (p50 / max) and its parts from the proxy's
Migration records: detection (last token -> failure seen), resume (failure -> next token), the
new prefill's cached tokens of prompt + tokens sent, the tokens replayed through decode steps,
and the new decode node's KV transfer.

Targets (the issue's): completed 100%; differing 0.

  python bench/failover.py [--streams 16] [--tokens 256] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import Stream as Timed
from bench.common import free_port_block, pct, table, window_rate, with_malloc_settings
from kvmesh import cluster
from kvmesh.client import AsyncClient
from kvmesh.errors import KvmeshError
from kvmesh.loadgen.workload import text_of
from kvmesh.model.folder import ModelFolder
from kvmesh.model.prepare import default_model_dir
from kvmesh.model.tokenizer import ChatTokenizer
from kvmesh.v1 import stream_pb2


@dataclass
class Outcome:
    timed: Timed
    ids: list[int] = field(default_factory=list)
    finished: stream_pb2.Finished | None = None
    detail: str = ""  # a failed stream's error

    @property
    def moved(self) -> bool:
        return self.finished is not None and len(self.finished.migrations) > 0


async def _stream(client: AsyncClient, prompt: str, i: int, tokens: int, out: Outcome) -> None:
    """One request, filling `out` as its events come (the killer watches the ids grow)."""
    params = {"max_tokens": tokens, "ignore_eos": True, "temperature": 0.8, "top_p": 0.95, "seed": i}
    out.timed.sent = time.perf_counter()
    try:
        async for event in client.generate(prompt=prompt, timeout=600, **params):
            if event.HasField("token"):
                out.timed.arrivals.append(time.perf_counter())
                out.ids.append(event.token.token_id)
            elif event.HasField("finished"):
                out.finished = event.finished
    except KvmeshError as e:
        out.timed.error = e.status
        out.detail = str(e)[:300]


async def _killer(outcomes: list[Outcome], procs: list[cluster.Process], tokens: int, at: float) -> list[str]:
    """SIGKILL decode-0 once the streams have `at` of their tokens on average, prefill-0 at twice
    that (or when every stream ended). -> what was killed, when."""
    plan = [(at, "decode-0"), (2 * at, "prefill-0")]
    killed: list[str] = []
    while plan:
        mean = sum(len(o.ids) for o in outcomes) / len(outcomes)
        ended = all(o.finished is not None or o.timed.error for o in outcomes)
        if mean >= plan[0][0] * tokens or ended:
            name = plan.pop(0)[1]
            os.kill(next(p for p in procs if p.name == name).pid, signal.SIGKILL)
            killed.append(f"{name} at {mean:.0f} tokens")
        await asyncio.sleep(0.005)
    return killed


async def _drive(
    endpoint: str, prompts: list[str], tokens: int, kill: tuple[list[cluster.Process], float] | None
) -> tuple[list[Outcome], list[str]]:
    client = AsyncClient(endpoint)
    outcomes = [Outcome(Timed(0.0)) for _ in prompts]
    tasks = [_stream(client, p, i, tokens, o) for i, (p, o) in enumerate(zip(prompts, outcomes, strict=True))]
    killer = _killer(outcomes, kill[0], tokens, kill[1]) if kill else None
    done = await asyncio.gather(*tasks, *([killer] if killer else []))
    await client.close()
    return outcomes, (done[-1] if killer else [])


def _run(args: argparse.Namespace, prompts: list[str], env: dict[str, str], kill: bool) -> dict[str, Any]:
    """One configuration on a fresh cluster."""
    saved = {k: os.environ.get(k) for k in ["KVMESH_HOME", *env]}
    os.environ.update({"KVMESH_HOME": tempfile.mkdtemp(prefix="kvmesh-failover-"), **env})
    try:
        spec = cluster.ClusterSpec(
            prefill=args.prefill, decode=args.decode, port=free_port_block(), http_port=0, model=str(args.model)
        )
        procs = cluster.up(spec)
        try:
            outcomes, killed = asyncio.run(
                _drive(procs[-1].address, prompts, args.tokens, (procs, args.kill_at) if kill else None)
            )
        finally:
            cluster.down(10)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return {"outcomes": outcomes, "killed": killed}


def _figures(name: str, run: dict[str, Any], reference: list[Outcome] | None, tokens: int) -> dict[str, Any]:
    outcomes: list[Outcome] = run["outcomes"]
    complete = [o for o in outcomes if o.finished is not None and len(o.ids) == tokens]
    moved = [o for o in outcomes if o.moved]
    migrations = [m for o in moved for m in o.finished.migrations]  # type: ignore[union-attr]
    gaps = [max(o.timed.gaps) * 1000 for o in moved]
    # a stream cut off counts as differing only if the tokens it got before the cut differ
    differ = (
        sum(1 for o, r in zip(outcomes, reference, strict=True) if o.ids != r.ids[: len(o.ids)]) if reference else 0
    )
    full = [o.timed for o in complete]
    return {
        "run": name,
        "killed": run["killed"],
        "streams": len(outcomes),
        "completed": len(complete),
        "differ": differ,
        "errors": sorted({f"{o.timed.error}: {o.detail}" for o in outcomes if o.timed.error}),
        "tok_s": window_rate(full) if len(full) == len(outcomes) else float("nan"),
        "moved": len(moved),
        "gap_p50_ms": pct(gaps, 50),
        "gap_max_ms": max(gaps, default=float("nan")),
        "detect_p50_ms": pct([m.detect_ms for m in migrations], 50),
        "resume_p50_ms": pct([m.resume_ms for m in migrations], 50),
        "resume_max_ms": max((m.resume_ms for m in migrations), default=float("nan")),
        "cached_p50": pct([m.cached_tokens for m in migrations], 50),
        "sent_p50": pct([m.tokens_sent for m in migrations], 50),
        "replayed_p50": pct([m.replayed_tokens for m in migrations], 50),
        "replayed_max": max((m.replayed_tokens for m in migrations), default=0),
        "kv_transfer_p50_ms": pct([o.finished.timings.kv_transfer_ms for o in moved], 50),  # type: ignore[union-attr]
    }


def main() -> None:
    with_malloc_settings()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=default_model_dir("int4"))
    ap.add_argument("--prefill", type=int, default=2)
    ap.add_argument("--decode", type=int, default=2)
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--kill-at", type=float, default=0.25, help="decode-0 killed at this share of the tokens")
    ap.add_argument("--rounds", type=int, default=2, help="undisturbed write-back on/off pairs")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    tok = ChatTokenizer(ModelFolder.load(args.model))
    rng = np.random.default_rng(7)
    prompts = [f"Story {i}: " + text_of(rng, args.prompt_tokens, tok.encode, tok.decode) for i in range(args.streams)]
    on_off = [("undisturbed", {}, False), ("write-back off", {"KVMESH_PROXY_WRITE_BACK": "0"}, False)]
    runs = [run for r in range(args.rounds) for run in (on_off if r % 2 == 0 else on_off[::-1])]
    runs += [("kill, migration on", {}, True), ("kill, migration off", {"KVMESH_PROXY_MIGRATION_LIMIT": "0"}, True)]
    rows: list[dict[str, Any]] = []
    reference: list[Outcome] | None = None
    for name, env, kill in runs:
        run = _run(args, prompts, env, kill)
        rows.append(_figures(name, run, reference, args.tokens))
        reference = reference or run["outcomes"]
        print(f"{name}: done ({', '.join(run['killed']) or 'nothing killed'})", file=sys.stderr, flush=True)
    on = [r["tok_s"] for r in rows if r["run"] == "undisturbed"]
    off = [r["tok_s"] for r in rows if r["run"] == "write-back off"]
    pairs = [a / b for a, b in zip(on, off, strict=True)]
    ratio = (
        float(np.nanmedian(pairs)) if not all(np.isnan(pairs)) else float("nan")
    )  # nan: a run never had all decoding
    print(
        f"\n{args.streams} streams x {args.tokens} tokens (seeded sampling), {args.prefill} prefill + "
        f"{args.decode} decode nodes; write-back on / off aggregate tok/s: {ratio:.2f}x "
        f"(rounds: {', '.join(f'{r:.2f}' for r in pairs)})"
    )
    cols = ["run", "completed", "differ", "tok_s", "moved", "gap_p50_ms", "gap_max_ms", "detect_p50_ms"]
    cols += ["resume_p50_ms", "resume_max_ms", "sent_p50", "cached_p50", "replayed_p50", "replayed_max"]
    cols += ["kv_transfer_p50_ms"]
    table(cols, [[r[c] for c in cols] for r in rows])
    for r in rows:
        if r["errors"]:
            print(f"{r['run']}: errors:\n  " + "\n  ".join(r["errors"]))
    if args.json:
        report = {"workload": vars(args) | {"model": str(args.model)}, "write_back_ratio": ratio, "rows": rows}
        args.json.write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
