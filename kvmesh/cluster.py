"""The local cluster: `kvmesh up` starts P prefill nodes, D decode nodes (or W colocated workers)
and the proxy as local processes on loopback ports, `kvmesh status` shows them, `kvmesh down`
stops them. State (pids, addresses) and logs live under $KVMESH_HOME/cluster."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvmesh.errors import InvalidArgument, KvmeshError, Unavailable
from kvmesh.model.prepare import kvmesh_home
from kvmesh.rpc import token_metadata
from kvmesh.settings import check_port
from kvmesh.v1 import decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc

# DESIGN.md: glibc otherwise returns each freed MiB to the OS and faults it in again.
MALLOC = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "4294967296", "MALLOC_TOP_PAD_": "268435456"}
SERVICES = {
    "prefill": "kvmesh.v1.Prefill",
    "decode": "kvmesh.v1.Decode",
    "worker": "kvmesh.v1.Decode",
    "proxy": "kvmesh.v1.Generation",
}


@dataclass(frozen=True)
class ClusterSpec:
    prefill: int = 2
    decode: int = 2
    workers: int = 0  # colocated workers (prefill and decode in one process), beside or instead of the pools
    port: int = 50051  # the proxy's; prefill nodes take port+10.., decode port+20.., workers port+30..
    policy: str = "cache_aware"
    model: str | None = None
    pin: bool = False  # prefill nodes on the first half of the cores, decode nodes on the rest
    threads: int = 1
    prefix_cache: bool = True
    http_port: int = 0  # the proxy's OpenAI HTTP API (0: off; `kvmesh up` asks for 8000)

    def __post_init__(self) -> None:
        if min(self.prefill, self.decode, self.workers) < 0 or self.threads < 1:
            raise InvalidArgument("node counts must be >= 0 and threads >= 1")
        if self.prefill + self.workers < 1 or self.decode + self.workers < 1:
            raise InvalidArgument(
                f"{self.prefill} prefill, {self.decode} decode and {self.workers} workers: a cluster needs a node "
                "that prefills and one that decodes (a colocated worker does both)"
            )
        check_port("port", self.port, low=1)
        check_port("http_port", self.http_port)


# Hand-set shapes fill what they leave out from these (the pools of the first builds).
HAND = {"prefill": 2, "decode": 2, "workers": 0, "threads": 1}


def shape_for(
    cores: int, prefill: int | None, decode: int | None, workers: int | None, threads: int | None
) -> tuple[dict[str, int | bool], str]:
    """The nodes `kvmesh up` starts on `cores` cores, and why. Any count given: that shape by hand.
    Measured on 2 cores (bench/peer.py, docs/results/2026-12-01): one colocated worker with both
    cores decodes fastest and answers first: separate pools there split 2 cores between 4
    single-threaded processes, each decode step runs on one core, and the KV crosses a process.
    From 4 cores on, prefill and decode get pools of their own (2 threads a node, pinned apart),
    so a long prompt's prefill never takes a core from the running decode steps (not measured on
    this kind of machine, which has 2 cores)."""
    if any(v is not None for v in (prefill, decode, workers, threads)):
        colocated = workers is not None and prefill is None and decode is None
        shape: dict[str, int | bool] = {
            "prefill": 0 if colocated else HAND["prefill"] if prefill is None else prefill,
            "decode": 0 if colocated else HAND["decode"] if decode is None else decode,
            "workers": HAND["workers"] if workers is None else workers,
            "threads": HAND["threads"] if threads is None else threads,
        }
        return shape, "set by hand"
    if cores < 4:
        why = f"{cores} cores: one process with every core decodes fastest (separate pools would split them)"
        return {"prefill": 0, "decode": 0, "workers": 1, "threads": cores}, why
    pools = cores // 4
    why = f"{cores} cores: prefill and decode pools of {pools} node(s) x 2 threads, pinned apart"
    return {"prefill": pools, "decode": pools, "workers": 0, "threads": 2, "pin": True}, why


def describe(spec: ClusterSpec) -> str:
    parts = [f"{n} {kind}" for kind, n in (("prefill", spec.prefill), ("decode", spec.decode)) if n]
    parts += [f"{spec.workers} colocated worker{'s' if spec.workers > 1 else ''}"] if spec.workers else []
    pinned = ", pinned" if spec.pin else ""
    each = " each" if spec.prefill + spec.decode + spec.workers > 1 else ""
    threads = f"{spec.threads} thread{'s' if spec.threads > 1 else ''}{each}"
    return f"{' + '.join(parts) or 'no nodes'}, {threads}{pinned}"


@dataclass
class Process:
    name: str
    kind: str  # prefill | decode | worker | proxy
    address: str
    pid: int
    log: str


def cluster_dir() -> Path:
    return kvmesh_home() / "cluster"


def _state_file() -> Path:
    return cluster_dir() / "state.json"


def load_state() -> list[Process]:
    if not _state_file().is_file():
        return []
    return [Process(**p) for p in json.loads(_state_file().read_text())]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def up(spec: ClusterSpec) -> list[Process]:
    """Start the cluster and wait until the proxy serves. Cores, when pinned: prefill nodes on the
    first half of this machine's cores, decode nodes on the rest (an imitation of separate pools)."""
    if any(_alive(p.pid) for p in load_state()):
        raise KvmeshError("a cluster is already up (kvmesh status; kvmesh down)")
    cores = sorted(os.sched_getaffinity(0))
    half = max(1, len(cores) // 2)
    pools = {"prefill": set(cores[:half]), "decode": set(cores[half:] or cores), "worker": set(cores)}
    logs = cluster_dir() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = _token_env(_new_token())
    model_flag = ["--model", spec.model] if spec.model else []
    cache_flag = [] if spec.prefix_cache else ["--no-prefix-cache"]
    port = spec.port
    procs: list[Process] = []
    try:
        pools_wanted = (("prefill", spec.prefill, port + 10), ("decode", spec.decode, port + 20))
        for kind, count, first in (*pools_wanted, ("worker", spec.workers, port + 30)):
            for i in range(count):
                name, p = f"{kind}-{i}", first + i
                flags = [kind, "--port", str(p), "--threads", str(spec.threads), "--node-id", name, *model_flag]
                if kind in ("prefill", "worker"):
                    flags += ["--store", str(cluster_dir() / name / "store"), *cache_flag]
                procs.append(_start(name, kind, p, flags, logs, pools[kind] if spec.pin else None, env))
        backends = [f for p in procs for f in (f"--{p.kind}", p.address)]
        proxy_flags = ["proxy", "--port", str(port), "--http-port", str(spec.http_port), "--policy", spec.policy]
        proxy_flags += [*backends, *model_flag]
        procs.append(_start("proxy", "proxy", port, proxy_flags, logs, None, env))
        _state_file().write_text(json.dumps([asdict(p) for p in procs], indent=2))
        _wait_serving(procs, timeout_s=120)
    except BaseException:
        _terminate(procs)
        raise
    return procs


def _new_token() -> str:
    """The cluster's secret for its internal calls, kept where `kvmesh status` finds it (0600)."""
    token = secrets.token_urlsafe(32)
    path = cluster_dir() / "token"
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text(token)
    return token


def cluster_token() -> str:
    path = cluster_dir() / "token"
    return path.read_text().strip() if path.is_file() else ""


def _token_env(token: str) -> dict[str, str]:
    """Every service's setting, through the environment (never on a command line: `ps` shows those)."""
    return {f"KVMESH_{service}_CLUSTER_TOKEN": token for service in ("PREFILL", "DECODE", "PROXY")}


def _start(
    name: str, kind: str, port: int, flags: list[str], logs: Path, cores: set[int] | None, env: dict[str, str]
) -> Process:
    log = logs / f"{name}.log"
    pin = None if cores is None else (lambda: os.sched_setaffinity(0, cores))
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kvmesh.cli", *flags],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **MALLOC, **env},
            start_new_session=True,
            preexec_fn=pin,
        )
    return Process(name, kind, f"127.0.0.1:{port}", proc.pid, str(log))


def health(p: Process, timeout_s: float = 1.0) -> str:
    try:
        with grpc.insecure_channel(p.address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=SERVICES[p.kind]), timeout=timeout_s
            )
            return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
    except grpc.RpcError:
        return "DOWN"


def _wait_serving(procs: list[Process], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for p in procs:
        while health(p) != "SERVING":
            if not _alive(p.pid) or time.monotonic() > deadline:
                tail = Path(p.log).read_text()[-2000:] if Path(p.log).is_file() else ""
                raise Unavailable(f"{p.name} did not start serving; its log ends:\n{tail}")
            time.sleep(0.2)
    time.sleep(1.0)  # the proxy's health and cache followers connect


def status() -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    meta = token_metadata(cluster_token())
    for p in load_state():
        row: dict[str, object] = {
            "name": p.name,
            "address": p.address,
            "pid": p.pid,
            "process": "running" if _alive(p.pid) else "gone",
            "health": health(p),
        }
        try:
            with grpc.insecure_channel(p.address) as channel:
                if p.kind in ("prefill", "worker"):
                    load = prefill_pb2_grpc.PrefillStub(channel).GetLoad(
                        prefill_pb2.GetLoadRequest(), timeout=1, metadata=meta
                    )
                    row["load"] = f"{load.running_requests} running, {load.queued_prefill_tokens} tokens queued"
                    hit = load.hit_tokens / load.lookup_tokens if load.lookup_tokens else 0.0
                    blocks = f"{load.store_blocks} blocks ({load.pinned_blocks} pinned), {load.store_bytes >> 20} MiB"
                    row["cache"] = f"{blocks}, hit rate {hit:.0%} of {load.lookup_tokens} tokens"
                if p.kind in ("decode", "worker"):
                    dl = decode_pb2_grpc.DecodeStub(channel).GetLoad(
                        decode_pb2.GetDecodeLoadRequest(), timeout=1, metadata=meta
                    )
                    held = f"{dl.waiting} waiting, {dl.kv_tokens_held} KV tokens held"
                    row["decode"] = f"{dl.running_sequences} decoding, {held}"
        except grpc.RpcError:
            pass
        rows.append(row)
    return rows


def down(timeout_s: float = 30) -> int:
    procs = load_state()
    _terminate(procs, timeout_s)
    if _state_file().is_file():
        _state_file().unlink()
    return len(procs)


def _terminate(procs: list[Process], timeout_s: float = 30) -> None:
    for p in procs:
        if _alive(p.pid):
            os.kill(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for p in procs:
        while _alive(p.pid) and time.monotonic() < deadline:
            _reap(p.pid)
            time.sleep(0.1)
        if _alive(p.pid):
            os.kill(p.pid, signal.SIGKILL)
        _reap(p.pid)


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
