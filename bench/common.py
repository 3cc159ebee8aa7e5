"""What the benchmarks share: starting services as processes, a timed decode client, tables."""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import grpc
import numpy as np

from kvmesh import cluster
from kvmesh.cluster import MALLOC

ROOT = Path(__file__).resolve().parents[1]


def with_malloc_settings() -> None:
    """Re-run this script with MALLOC set, so its own client side gets them too."""
    if any(os.environ.get(k) != v for k, v in MALLOC.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC})


def spawn(args: Sequence[str], cores: set[int] | None = None) -> tuple[subprocess.Popen[str], int]:
    """Start `kvmesh ARGS --port 0` (optionally pinned to cores); -> (process, its gRPC port)."""
    cmd = [sys.executable, "-m", "kvmesh.cli", *args, "--port", "0"]
    pin = None if cores is None else (lambda: os.sched_setaffinity(0, cores))
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **MALLOC},
        preexec_fn=pin,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if m := re.search(r"listening on [\d.]+:(\d+)", line):
            # Keep reading its log: a pipe nobody reads fills (64 KiB) and the service blocks on
            # its next log line. The last lines go to stderr if it dies.
            threading.Thread(target=_drain, args=(proc, " ".join(args[:1])), daemon=True).start()
            return proc, int(m.group(1))
    raise RuntimeError(f"{' '.join(args)} exited before listening")


def _drain(proc: subprocess.Popen[str], name: str) -> None:
    assert proc.stdout is not None
    tail: deque[str] = deque(maxlen=20)
    for line in proc.stdout:
        tail.append(line)
    if proc.wait() not in (0, -15):  # not stopped by stop()
        print(f"{name} exited with {proc.returncode}; its last lines:\n{''.join(tail)}", file=sys.stderr)


def stop(*procs: subprocess.Popen[str]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait(60)


@dataclass
class Stream:
    """One Decode call as the client saw it: send time, token arrival times, the final event."""

    sent: float
    arrivals: list[float] = field(default_factory=list)
    cached_tokens: int = 0
    prompt_tokens: int = 0
    error: str = ""

    @property
    def ttft(self) -> float:
        return self.arrivals[0] - self.sent

    @property
    def gaps(self) -> list[float]:
        return list(np.diff(self.arrivals))


async def decode_stream(stub: object, request: object) -> Stream:
    s = Stream(time.perf_counter())
    try:
        async for ev in stub.Decode(request, timeout=300):  # type: ignore[attr-defined]
            if ev.HasField("token"):
                s.arrivals.append(time.perf_counter())
            elif ev.HasField("finished"):
                s.cached_tokens = ev.finished.usage.cached_tokens
    except grpc.aio.AioRpcError as e:
        s.error = e.code().name
    return s


def window_rate(streams: Sequence[Stream]) -> float:
    """Aggregate decode tokens/s of streams that ran together: the tokens received from the moment
    the last one decodes (its second token) to the moment the first one ends, over that window;
    nan when no instant had every stream decoding."""
    start, end = _window(streams)
    n = sum(1 for s in streams for t in s.arrivals if start < t <= end)
    return n / (end - start) if end > start else float("nan")


def window_gaps(streams: Sequence[Stream]) -> list[float]:
    """Inter-token gaps (s) that end inside window_rate's window: the steady batch, without the
    gaps the joins (later streams' prefills and KV) make in the streams already decoding."""
    start, end = _window(streams)
    return [b - a for s in streams for a, b in pairwise(s.arrivals) if start < b <= end and a >= start]


def _window(streams: Sequence[Stream]) -> tuple[float, float]:
    """(the last stream's second token, the first stream's last): every stream decodes between."""
    return max(s.arrivals[1] for s in streams), min(s.arrivals[-1] for s in streams)


def pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if len(values) else float("nan")


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    widths = [max(len(str(h)), *(len(_fmt(r[i])) for r in rows)) for i, h in enumerate(header)]
    print("  ".join(str(h).rjust(w) for h, w in zip(header, widths, strict=True)))
    for r in rows:
        print("  ".join(_fmt(v).rjust(w) for v, w in zip(r, widths, strict=True)))


def _fmt(v: object) -> str:
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cluster_spec(args: argparse.Namespace) -> cluster.ClusterSpec:
    """What `kvmesh up` would start here (or --shape's flags), on a free block of ports."""
    from kvmesh.cli import parse
    from kvmesh.commands import up_spec

    port = args.port or free_port_block()
    spec, why = up_spec(
        parse(["up", "--port", str(port), "--http-port", "0", "--model", str(args.model), *(args.shape or "").split()])
    )
    print(f"kvmesh shape: {cluster.describe(spec)} ({why})", file=sys.stderr)
    return spec


def free_port_block() -> int:
    """A port whose next 40 are free too (the cluster's nodes take port+10.., +20.., +30..)."""
    for _ in range(50):
        base = free_port()
        if base + 40 < 65536 and all(_port_free(base + i) for i in range(1, 40)):
            return base
    raise RuntimeError("no block of free ports")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
