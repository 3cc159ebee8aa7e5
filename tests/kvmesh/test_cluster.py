"""The local cluster as processes (kvmesh up): 3 prefill and 2 decode nodes behind the proxy, the
tiny model with a 2,048-token context; 20 sessions x 4 turns over 2 system prompts, per routing
policy; one prefill node killed mid-run; one decode node killed mid-stream."""

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from kvmesh import cluster
from kvmesh.client import Client
from kvmesh.errors import KvmeshError, Unavailable
from kvmesh.model.folder import ModelFolder
from kvmesh.rpc import token_metadata
from kvmesh.v1 import decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc

SYSTEMS = [
    "You are the archivist of a harbour town. " * 30,  # ~1,200 tokens each (byte-level tiny vocab)
    "You answer questions about trains, timetables and the history of railways in short sentences. " * 13,
]
SESSIONS, TURNS = 20, 4


@dataclass
class Turn:
    session: int
    turn: int
    prefill_node: str
    prompt_tokens: int
    cached_tokens: int
    reason: str = ""
    attempt: int = 1
    error: str = ""


def _start(folder: ModelFolder, policy: str, port: int) -> list[cluster.Process]:
    return cluster.up(cluster.ClusterSpec(prefill=3, decode=2, port=port, policy=policy, model=str(folder.path)))


def _conversations(endpoint: str, kill: cluster.Process | None = None) -> list[Turn]:
    client = Client(endpoint)
    history = {s: [{"role": "system", "content": SYSTEMS[s % 2]}] for s in range(SESSIONS)}
    turns: list[Turn] = []
    for t in range(1, TURNS + 1):
        if kill is not None and t == 3:
            os.kill(kill.pid, signal.SIGKILL)
        for s in range(SESSIONS):
            history[s].append({"role": "user", "content": f"Question {t} of session {s}?"})
            try:
                reply = client.chat(history[s], session_id=f"session-{s}", max_tokens=8, timeout=60)
            except KvmeshError as e:
                turns.append(Turn(s, t, "", 0, 0, error=e.status))
                history[s].pop()
                continue
            assert reply.started is not None and reply.finished is not None
            started, usage = reply.started, reply.finished.usage
            turns.append(
                Turn(
                    s,
                    t,
                    started.prefill_node,
                    usage.prompt_tokens,
                    usage.cached_tokens,
                    started.routing_reason,
                    started.attempt,
                )
            )
            history[s].append({"role": "assistant", "content": reply.text})
        time.sleep(0.3)  # think time: the nodes store the new blocks and tell the proxy
    return turns


def _cached_ratio(turns: list[Turn]) -> float:
    later = [t for t in turns if t.turn >= 2 and not t.error]
    return sum(t.cached_tokens for t in later) / sum(t.prompt_tokens for t in later)


def _hits(procs: list[cluster.Process]) -> int:
    from kvmesh.rpc import token_metadata

    total, meta = 0, token_metadata(cluster.cluster_token())  # the cluster's own token: internal calls need it
    for p in procs:
        if p.kind == "prefill":
            with grpc.insecure_channel(p.address) as channel:
                load = prefill_pb2_grpc.PrefillStub(channel).GetLoad(
                    prefill_pb2.GetLoadRequest(), timeout=5, metadata=meta
                )
                total += load.hit_tokens
    return total


def test_policies_on_multi_turn_sessions(long_tiny: ModelFolder, home: Path) -> None:
    ratios = {}
    for i, policy in enumerate(("cache_aware", "session_hash", "random", "round_robin")):
        os.environ["KVMESH_HOME"] = str(home / policy)
        procs = _start(long_tiny, policy, 52051 + 100 * i)
        try:
            turns = _conversations(procs[-1].address)
            assert not [t for t in turns if t.error]
            # what each answer reports as cached is what the prefill nodes' stores supplied
            assert sum(t.cached_tokens for t in turns) == _hits(procs)
            ratios[policy] = _cached_ratio(turns)
        finally:
            cluster.down(10)
    print("\ncached / prompt tokens over turns 2-4: " + ", ".join(f"{p} {r:.3f}" for p, r in ratios.items()))
    assert ratios["cache_aware"] >= 0.9
    assert ratios["session_hash"] >= 0.9


def test_a_prefill_node_killed_mid_run(long_tiny: ModelFolder, home: Path) -> None:
    procs = _start(long_tiny, "cache_aware", 52551)
    victim = procs[1]  # prefill-1
    turns = _conversations(procs[-1].address, kill=victim)
    errors = [t for t in turns if t.error]
    assert all(t.error == "UNAVAILABLE" for t in errors)  # nothing else, nothing lost silently
    assert len(turns) == SESSIONS * TURNS  # every request ended: answered or UNAVAILABLE, none hung
    node_of = {(t.session, t.turn): t.prefill_node for t in turns if not t.error}
    for s in range(SESSIONS):
        before = node_of.get((s, 2))
        after = node_of.get((s, 3))
        if before and before != victim.address:
            its_turns = [t for t in turns if t.session == s]
            assert after == before, f"session {s} moved from {before} to {after} though its node lived: {its_turns}"
        elif before == victim.address:
            assert after != victim.address
    assert len(errors) <= SESSIONS // 3 + 1


def test_kvmesh_chat_keeps_one_session_across_turns(long_tiny: ModelFolder, home: Path) -> None:
    """`kvmesh chat` as an operator runs it: two turns on stdin, an empty line ends the session;
    the second turn's prompt holds the first, so the worker's store supplies part of it."""
    procs = cluster.up(cluster.ClusterSpec(prefill=0, decode=0, workers=1, port=52751, model=str(long_tiny.path)))
    kvmesh = Path(sys.executable).with_name("kvmesh")
    args = [str(kvmesh), "chat", "--endpoint", procs[-1].address, "--system", SYSTEMS[0], "--max-tokens", "4"]
    done = subprocess.run(
        args, input="First question?\nAnd a second one?\n\n", capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    stats = [line for line in done.stderr.splitlines() if line.startswith("[")]
    assert len(stats) == 2, done.stderr
    cached = [int(line.split(" cached")[0].rsplit(" ", 1)[1]) for line in stats]
    assert cached[0] == 0 and cached[1] > 1000  # the system prompt and the first turn, from the store
    generated = [int(line.split(" generated")[0].rsplit(" ", 1)[1]) for line in stats]
    assert all(1 <= g <= 4 for g in generated) and done.stdout.strip()
    # A request the proxy refuses reaches the operator as one line: the status and the reason.
    too_long = " ".join(str(i) for i in range(2048))
    refused = subprocess.run(
        [str(kvmesh), "generate", "--endpoint", procs[-1].address, "--raw", too_long],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    last = refused.stderr.strip().splitlines()[-1]  # refused by its size or its token count
    assert last.startswith("kvmesh: error: INVALID_ARGUMENT: ") and "fit the model's context" in last


def test_a_decode_node_killed_mid_stream_without_migration(
    long_tiny: ModelFolder, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Migration off (--migration-limit 0; on, tests/test_migration.py): the client has tokens
    already, so the call ends at once in UNAVAILABLE naming the decode node and how far the stream
    got; the other decode node serves the next request."""
    monkeypatch.setenv("KVMESH_PROXY_MIGRATION_LIMIT", "0")
    procs = cluster.up(cluster.ClusterSpec(prefill=1, decode=2, port=52851, model=str(long_tiny.path)))
    client = Client(procs[-1].address)
    events = client.generate(prompt="Once upon a time", max_tokens=2000, ignore_eos=True, timeout=60)
    started = next(events).started
    tokens = [next(events) for _ in range(5)]
    assert all(e.HasField("token") for e in tokens)
    victim = next(p for p in procs if p.address == started.decode_node)
    os.kill(victim.pid, signal.SIGKILL)
    with pytest.raises(Unavailable) as failed:  # kvmesh.client raises kvmesh's own errors
        for _ in events:
            pass
    assert failed.value.status == "UNAVAILABLE" and isinstance(failed.value.__cause__, grpc.RpcError)
    details = str(failed.value)
    assert f"decode node {victim.address}" in details and "the stream broke after " in details
    assert "not migrated: migrated 0 times already (limit 0)" in details
    assert int(details.split("after ")[1].split(" ")[0]) >= 5
    reply = client.chat([{"role": "user", "content": "Still there?"}], max_tokens=4, timeout=60)
    assert reply.finished is not None and reply.started is not None
    assert reply.started.decode_node != victim.address


@pytest.mark.parametrize("kind", ["decode", "prefill"])
def test_a_frozen_node_is_noticed_and_its_requests_answered_elsewhere(
    long_tiny: ModelFolder, home: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """A node frozen with SIGSTOP neither fails nor answers: requests routed to it before the proxy
    notices are retried elsewhere when their first token is overdue (with and without a client
    deadline), then it leaves routing (missed load polls); thawed, it is routed to again within
    about a second."""
    monkeypatch.setenv("KVMESH_PROXY_STALL_TIMEOUT_S", "1.5")
    spec = cluster.ClusterSpec(prefill=2 if kind == "prefill" else 1, decode=2 if kind == "decode" else 1)
    procs = cluster.up(cluster.ClusterSpec(**{**spec.__dict__, "port": 52951, "model": str(long_tiny.path)}))
    client = Client(procs[-1].address)
    victim = next(p for p in procs if p.kind == kind)
    os.kill(victim.pid, signal.SIGSTOP)
    try:
        where = f"{kind}_node"
        with ThreadPoolExecutor(1) as pool:  # a call without a deadline, bounded here all the same
            for i, timeout in enumerate((None, 30.0, None, 30.0, None, 30.0)):
                messages = [{"role": "user", "content": f"question {i}"}]
                call = pool.submit(client.chat, messages, session_id=f"s{i}", max_tokens=4, timeout=timeout)
                reply = call.result(timeout=60)
                assert reply.finished is not None and reply.started is not None
                assert getattr(reply.started, where) != victim.address
    finally:
        os.kill(victim.pid, signal.SIGCONT)
    deadline = time.monotonic() + 10
    seen: set[str] = set()
    for i in range(1000):  # re-admitted: requests reach it again (raw prompts sharing no block)
        if victim.address in seen:
            break
        assert time.monotonic() < deadline, "the thawed node was not routed to again"
        events = list(client.generate(prompt=f"{i} {time.monotonic()} back?", max_tokens=2, timeout=30))
        seen.add(getattr(events[0].started, f"{kind}_node"))


def test_a_drained_node_finishes_its_request_then_exits_at_once(long_tiny: ModelFolder, home: Path) -> None:
    """SIGTERM to a decode node with a request in progress (held before its first token by a frozen
    prefill node): the request is answered in full, and the node exits once it is idle, not when
    its 30 s drain is over (the proxy's health watch on it never ends by itself)."""
    procs = cluster.up(cluster.ClusterSpec(prefill=1, decode=1, port=53251, model=str(long_tiny.path)))
    prefill, decode = procs[0], procs[1]
    load = decode_pb2_grpc.DecodeStub(grpc.insecure_channel(decode.address)).GetLoad
    meta = token_metadata(cluster.cluster_token())
    os.kill(prefill.pid, signal.SIGSTOP)
    try:
        with ThreadPoolExecutor(1) as pool:
            messages = [{"role": "user", "content": "still answered?"}]
            call = pool.submit(Client(procs[-1].address).chat, messages, max_tokens=8, ignore_eos=True, timeout=60)
            deadline = time.monotonic() + 20
            while load(decode_pb2.GetDecodeLoadRequest(), metadata=meta).waiting < 1:  # admitted, waiting for KV
                assert time.monotonic() < deadline, "the request never reached the decode node"
                time.sleep(0.05)
            os.kill(decode.pid, signal.SIGTERM)
            time.sleep(1.0)  # draining now, the request still held
            assert cluster._alive(decode.pid)
            os.kill(prefill.pid, signal.SIGCONT)
            reply = call.result(timeout=60)
    finally:
        os.kill(prefill.pid, signal.SIGCONT)
    assert reply.finished is not None and reply.finished.usage.completion_tokens == 8
    deadline = time.monotonic() + 15  # half the drain: it left because it was idle
    while cluster._alive(decode.pid):
        cluster._reap(decode.pid)
        assert time.monotonic() < deadline, "the drained node waited out its drain"
        time.sleep(0.1)
