"""Multi-turn chats through the proxy: is the whole conversation, reply included, cached?

Workload: --sessions chats at once (4), each --turns turns (5): one shared --system-tokens system
prompt (2,000), a --user-tokens user message per turn (100, different in every turn and session),
greedy replies of exactly --reply-tokens each (64 and 512; EOS ignored), the reply's text sent back
as the assistant turn, as a chat client does. kvmesh: the local cluster in the shape `kvmesh up`
picks for this machine (or --shape), a fresh KVMESH_HOME (empty store) per configuration: the
proxy's reply write-back off (KVMESH_PROXY_WRITE_BACK=0), on with `--reply-kv exact`
(the prefill side recomputes a finished reply's blocks exactly, between prompts, so the next turn
reads what an exact prefill makes), and on with `--reply-kv decoded` (the default: the decode steps' own KV, int8
activations, reused as is); their order rotating by reply length. --think-s: the user's pause
between a reply and the next turn (0: the next turn at once, the exact recompute's worst case). Per
turn the proxy's usage: prompt tokens, cached tokens (what the store supplied), computed = prompt -
cached; new = the tokens after the previous turn's prompt and reply (the user message and the
template's markers); TTFT at the client. The decode side's resident memory (the decode or worker
processes' VmRSS): at rest after start, its peak while the sessions run, after.

Targets (the issue's): computed per later turn <= new + 16 with write-back; TTFT of turns 2-5 with
write-back <= 0.7x without at 512-token replies. Also: turns whose reply text equals the run without
write-back (greedy: the same KV gives the same text).

  python bench/multiturn.py [--reply-tokens 64 512] [--think-s 0] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import cluster_spec, pct, table, with_malloc_settings
from kvmesh import cluster
from kvmesh.client import AsyncClient
from kvmesh.loadgen.driver import timed_turn
from kvmesh.loadgen.workload import text_of
from kvmesh.model.folder import ModelFolder
from kvmesh.model.prepare import default_model_dir
from kvmesh.model.tokenizer import ChatTokenizer


def _rss(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                total += next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            pass
    return total


class Peak(threading.Thread):
    """The largest summed RSS of `pids`, sampled every 0.2 s until stopped."""

    def __init__(self, pids: list[int]) -> None:
        super().__init__(daemon=True)
        self.pids, self.peak, self._stop_event = pids, 0, threading.Event()
        self.start()

    def run(self) -> None:
        while not self._stop_event.wait(0.2):
            self.peak = max(self.peak, _rss(self.pids))

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return self.peak


MODES = ("off", "exact", "decoded")  # write-back off; on, the reply KV recomputed exactly or as decoded


async def _session(
    client: AsyncClient, name: str, system: str, users: list[str], reply_tokens: int, think_s: float
) -> list[dict[str, Any]]:
    history = [{"role": "system", "content": system}]
    turns: list[dict[str, Any]] = []
    for i, user in enumerate(users):
        history.append({"role": "user", "content": user})
        r, text = await timed_turn(
            client, name, history, i, time.perf_counter(), max_tokens=reply_tokens, ignore_eos=True
        )
        if r.error:
            raise RuntimeError(f"session {name}, turn {i}: {r.error}")
        turns.append(
            {
                "ttft_s": r.ttft_s,
                "prompt": r.prompt_tokens,
                "cached": r.cached_tokens,
                "completion": r.completion_tokens,
                "text": text,
            }
        )
        history.append({"role": "assistant", "content": text})
        if i + 1 < len(users):
            await asyncio.sleep(think_s)
    for prev, turn in itertools.pairwise(turns):
        turn["new"] = turn["prompt"] - prev["prompt"] - prev["completion"]
    return turns


def run_config(args: argparse.Namespace, mode: str, reply_tokens: int, texts: dict[str, Any]) -> dict[str, Any]:
    home = Path(tempfile.mkdtemp(prefix="kvmesh-multiturn-"))
    os.environ["KVMESH_HOME"] = str(home)
    os.environ["KVMESH_PROXY_WRITE_BACK"] = "0" if mode == "off" else "1"
    for service in ("PREFILL", "WORKER"):
        os.environ[f"KVMESH_{service}_REPLY_KV"] = "decoded" if mode == "decoded" else "exact"
    spec = cluster_spec(args)
    procs = cluster.up(spec)
    decode_pids = [p.pid for p in procs if p.kind in ("decode", "worker")]
    try:
        time.sleep(1.0)
        rest = _rss(decode_pids)
        peak = Peak(decode_pids)

        async def sessions() -> list[list[dict[str, Any]]]:
            client = AsyncClient(f"127.0.0.1:{spec.port}")
            try:
                return await asyncio.gather(
                    *(
                        _session(client, f"s{i}", texts["system"], texts["users"][i], reply_tokens, args.think_s)
                        for i in range(args.sessions)
                    )
                )
            finally:
                await client.close()

        start = time.perf_counter()
        per_session = asyncio.run(sessions())
        wall = time.perf_counter() - start
        high = peak.stop()
        after = _rss(decode_pids)
    finally:
        cluster.down()
    later = [t for s in per_session for t in s[1:]]
    computed = [t["prompt"] - t["cached"] for t in later]
    excess = [t["prompt"] - t["cached"] - t["new"] for t in later]
    return {
        "mode": mode,
        "reply_tokens": reply_tokens,
        "shape": cluster.describe(spec),
        "turns": per_session,
        "computed_later_mean": float(np.mean(computed)) if computed else 0.0,
        "new_later_mean": float(np.mean([t["new"] for t in later])) if later else 0.0,
        "excess_later_max": max(excess) if excess else 0,
        "ttft_first_p50_s": pct([s[0]["ttft_s"] for s in per_session], 50),
        "ttft_later_p50_s": pct([t["ttft_s"] for t in later], 50) if later else 0.0,
        "ttft_later_p99_s": pct([t["ttft_s"] for t in later], 99) if later else 0.0,
        "rss_rest_mb": rest / 1e6,
        "rss_peak_mb": max(high, after) / 1e6,
        "rss_after_mb": after / 1e6,
        "wall_s": wall,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, default=4)
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--system-tokens", type=int, default=2000)
    ap.add_argument("--user-tokens", type=int, default=100)
    ap.add_argument("--reply-tokens", type=int, nargs="+", default=[64, 512])
    ap.add_argument("--think-s", type=float, default=0.0, help="pause between a reply and the next turn")
    ap.add_argument("--model", type=Path, default=None, help="model folder (default: the prepared SmolLM2 int4)")
    ap.add_argument("--shape", help="kvmesh's cluster as `kvmesh up` flags, e.g. '--prefill 1 --decode 1'")
    ap.add_argument("--port", type=int, default=0, help="the proxy's port (0: a free block)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    with_malloc_settings()
    args.model = args.model or default_model_dir("int4")
    tok = ChatTokenizer(ModelFolder.load(args.model))
    rng = np.random.default_rng(7)
    texts = {
        "system": text_of(rng, args.system_tokens, tok.encode, tok.decode),
        "users": [
            [text_of(rng, args.user_tokens, tok.encode, tok.decode) for _ in range(args.turns)]
            for _ in range(args.sessions)
        ],
    }
    results = []
    for i, reply in enumerate(args.reply_tokens):
        for mode in MODES[i % 3 :] + MODES[: i % 3]:
            r = run_config(args, mode, reply, texts)
            print(f"reply {reply}, write-back {mode}: {r['wall_s']:.0f} s", file=sys.stderr)
            results.append(r)
    print(
        f"\n{args.sessions} sessions x {args.turns} turns, {args.system_tokens}-token system prompt, "
        f"{args.user_tokens}-token user messages, {args.think_s:g} s between turns; shape: {results[0]['shape']}"
    )
    rows = []
    for r in results:
        rows.append(
            [
                r["reply_tokens"],
                r["mode"],
                round(r["computed_later_mean"], 1),
                round(r["new_later_mean"], 1),
                r["excess_later_max"],
                round(r["ttft_first_p50_s"] * 1000),
                round(r["ttft_later_p50_s"] * 1000),
                round(r["ttft_later_p99_s"] * 1000),
                round(r["rss_rest_mb"]),
                round(r["rss_peak_mb"]),
                round(r["rss_after_mb"]),
            ]
        )
    table(
        [
            "reply",
            "write-back",
            "computed/turn",
            "new/turn",
            "excess max",
            "TTFT1 p50 ms",
            "TTFT2+ p50 ms",
            "TTFT2+ p99 ms",
            "RSS rest MB",
            "RSS peak MB",
            "RSS after MB",
        ],
        rows,
    )
    ratios: dict[str, dict[str, float]] = {}
    for reply in args.reply_tokens:
        off = next(r for r in results if r["reply_tokens"] == reply and r["mode"] == "off")
        for mode in MODES[1:]:
            on = next(r for r in results if r["reply_tokens"] == reply and r["mode"] == mode)
            ratios[f"{reply} {mode}"] = {
                "ttft_later_p50": _ratio(on["ttft_later_p50_s"], off["ttft_later_p50_s"]),
                "ttft_later_p99": _ratio(on["ttft_later_p99_s"], off["ttft_later_p99_s"]),
                "computed_later": _ratio(on["computed_later_mean"], off["computed_later_mean"]),
                # greedy replies turn by turn against write-back off (every turn computed exactly)
                "same_text_turns": sum(
                    a["text"] == b["text"]
                    for sa, sb in zip(on["turns"], off["turns"], strict=True)
                    for a, b in zip(sa, sb, strict=True)
                ),
                "turns": sum(len(s) for s in on["turns"]),
            }
    print("\nwrite-back on / off (target at 512-token replies: TTFT of turns 2+ <= 0.7; computed <= new + 16)")
    table(
        ["reply, reply KV", "TTFT2+ p50", "TTFT2+ p99", "computed/turn", "same reply text (turns)"],
        [
            [
                k,
                round(v["ttft_later_p50"], 2),
                round(v["ttft_later_p99"], 2),
                round(v["computed_later"], 3),
                f"{v['same_text_turns']} of {v['turns']}",
            ]
            for k, v in ratios.items()
        ],
    )
    if args.json:
        args.json.write_text(json.dumps({"results": results, "on_over_off": ratios}, indent=2) + "\n")


def _ratio(a: float, b: float) -> float:
    return a / b if b else 0.0


if __name__ == "__main__":
    main()
