"""Streams that survive a node's loss (processes on 127.0.0.1, the tiny model with a 2,048-token
context): a decode node killed, drained or frozen mid-stream, a prefill node lost while its KV
streams. Each stream is compared with an undisturbed run of the same request: the same token ids
and text, one Finished with the whole request's usage and its migrations."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from kvmesh import cluster
from kvmesh.client import Client, Reply
from kvmesh.errors import Unavailable
from kvmesh.model.folder import ModelFolder
from kvmesh.v1 import generation_pb2

PROMPT = "The harbour archive keeps the ledgers of every ship that came in. " * 6
GREEDY: dict[str, Any] = {}
SAMPLED: dict[str, Any] = {"temperature": 0.9, "top_p": 0.9, "seed": 1234}
TOKENS = 160


def _up(folder: ModelFolder, port: int, prefill: int = 1, decode: int = 2) -> list[cluster.Process]:
    return cluster.up(cluster.ClusterSpec(prefill=prefill, decode=decode, port=port, model=str(folder.path)))


def _run(endpoint: str, params: dict[str, Any], disturb: Any = None, after: int = 30, tokens: int = TOKENS) -> Reply:
    """One request to its end; `disturb(started)` once `after` tokens have arrived."""
    reply = Reply()
    events = Client(endpoint).generate(prompt=PROMPT, max_tokens=tokens, ignore_eos=True, timeout=120, **params)
    for event in events:
        reply.add(event)
        if disturb is not None and len(reply.token_ids) == after and event.HasField("token"):
            assert reply.started is not None
            disturb(reply.started)
    return reply


def _same(moved: Reply, undisturbed: Reply, reasons: list[str]) -> None:
    assert moved.token_ids == undisturbed.token_ids
    assert moved.text == undisturbed.text
    assert moved.finished is not None and undisturbed.finished is not None
    usage = moved.finished.usage
    assert (
        usage.completion_tokens == len(undisturbed.token_ids)
        and usage.prompt_tokens == undisturbed.finished.usage.prompt_tokens
    )
    assert [m.reason for m in moved.finished.migrations] == reasons
    for m in moved.finished.migrations:
        assert m.tokens_sent >= 30 and m.to_decode_node and m.to_decode_node != m.from_decode_node
        assert m.replayed_tokens >= 1 and m.resume_ms > 0


def _node(procs: list[cluster.Process], address: str) -> cluster.Process:
    return next(p for p in procs if p.address == address)


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_a_decode_node_killed_mid_stream_goes_on_exactly(
    long_tiny: ModelFolder, home: Path, params: dict[str, Any]
) -> None:
    """SIGKILL of the decode node after 30 tokens: the stream moves to the other decode node,
    resumes from the KV written back block by block (prompt + output), and the client's token
    ids and text are an undisturbed run's, greedy or seeded temperature/top-p sampling."""
    procs = _up(long_tiny, 54051)
    endpoint = procs[-1].address
    undisturbed = _run(endpoint, params)
    assert undisturbed.finished is not None and not undisturbed.finished.migrations
    killed: list[str] = []

    def kill(started: generation_pb2.Started) -> None:
        killed.append(started.decode_node)
        os.kill(_node(procs, started.decode_node).pid, signal.SIGKILL)

    moved = _run(endpoint, params, kill)
    _same(moved, undisturbed, ["unavailable"])
    assert moved.finished is not None and moved.finished.migrations[0].from_decode_node == killed[0]
    # the prompt and most of the output came from the store: only the tail after the last block
    # that reached it ran through decode steps again
    m = moved.finished.migrations[0]
    print(f"\nmigration: {m}")
    assert m.cached_tokens + m.replayed_tokens == m.tokens_sent + moved.finished.usage.prompt_tokens
    assert m.cached_tokens > moved.finished.usage.prompt_tokens and m.replayed_tokens < m.tokens_sent


def test_every_decode_node_killed_ends_unavailable_naming_them(long_tiny: ModelFolder, home: Path) -> None:
    """No node left to migrate to: UNAVAILABLE, naming the decode nodes tried and the tokens the
    client got, after at most --migration-limit moves."""
    procs = _up(long_tiny, 54151)
    decoders = [p for p in procs if p.kind == "decode"]

    def kill_all(started: generation_pb2.Started) -> None:
        for p in decoders:
            os.kill(p.pid, signal.SIGKILL)

    with pytest.raises(Unavailable) as failed:
        _run(procs[-1].address, GREEDY, kill_all)
    details = str(failed.value)
    assert "the stream broke after " in details and int(details.split("after ")[1].split(" ")[0]) >= 30
    assert "not migrated" in details and "decode nodes tried: " in details
    assert any(p.address in details.split("decode nodes tried: ")[1] for p in decoders)


def test_a_drained_decode_node_hands_its_streams_over(
    long_tiny: ModelFolder, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM with a 0.2 s drain: the node takes no new request, its stream runs on for the
    drain, then ends in a status the proxy migrates; the client's stream is the undisturbed one
    (1,500 tokens: the tiny model makes one in well under a millisecond)."""
    monkeypatch.setenv("KVMESH_DECODE_DRAIN_SECONDS", "0.2")
    procs = _up(long_tiny, 54251)
    endpoint = procs[-1].address
    undisturbed = _run(endpoint, GREEDY, tokens=1500)

    def drain(started: generation_pb2.Started) -> None:
        os.kill(_node(procs, started.decode_node).pid, signal.SIGTERM)

    moved = _run(endpoint, GREEDY, drain, tokens=1500)
    _same(moved, undisturbed, ["draining"])


def test_a_frozen_decode_node_is_left_after_the_stall_timeout(
    long_tiny: ModelFolder, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGSTOP of the decode node mid-stream: the stream moves after the stall timeout (1.5 s here)
    and ends as the undisturbed one; the node thawed afterwards adds no token to it."""
    monkeypatch.setenv("KVMESH_PROXY_STALL_TIMEOUT_S", "1.5")
    procs = _up(long_tiny, 54351)
    endpoint = procs[-1].address
    undisturbed = _run(endpoint, SAMPLED)
    frozen: list[cluster.Process] = []

    def freeze(started: generation_pb2.Started) -> None:
        frozen.append(_node(procs, started.decode_node))
        os.kill(frozen[0].pid, signal.SIGSTOP)

    try:
        moved = _run(endpoint, SAMPLED, freeze)
    finally:
        for p in frozen:
            os.kill(p.pid, signal.SIGCONT)
    _same(moved, undisturbed, ["stalled"])
    again = _run(endpoint, SAMPLED)  # the thawed node serves again; nothing of the old stream leaks
    assert again.token_ids == undisturbed.token_ids


def test_a_prefill_node_lost_while_its_kv_streams(
    long_tiny: ModelFolder, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The prefill node a request was routed to dies after the first token was sent, while its
    KV is on the way (a relay in front of it exits after 2 of its chunks): the stream goes on
    through the other prefill node, the first token not sent twice."""
    monkeypatch.setenv("KVMESH_PREFILL_CHUNK_BYTES", "4096")
    procs = _up(long_tiny, 54451, prefill=2)
    undisturbed = _run(procs[-1].address, SAMPLED)
    prefill = [p for p in procs if p.kind == "prefill"]
    decode = [p for p in procs if p.kind == "decode"]
    relay = subprocess.Popen(
        [sys.executable, "-m", "tests.helpers.relay", prefill[0].address, "die:2"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert relay.stdout is not None
    relay_address = f"127.0.0.1:{relay.stdout.readline().strip()}"
    flags = ["--prefill", relay_address, "--prefill", prefill[1].address]
    flags += [f for p in decode for f in ("--decode", p.address)]
    env = {**os.environ, "KVMESH_PROXY_CLUSTER_TOKEN": cluster.cluster_token()}
    args = [sys.executable, "-m", "kvmesh.cli", "proxy", "--model", str(long_tiny.path), "--port", "54499"]
    args += ["--http-port", "0", "--policy", "round_robin", *flags]  # round robin: the relay first
    proxy = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        probe = cluster.Process("p", "proxy", "127.0.0.1:54499", proxy.pid, "")
        while cluster.health(probe) != "SERVING":
            assert time.monotonic() < deadline and proxy.poll() is None, "the second proxy did not start"
            time.sleep(0.2)
        time.sleep(1.0)  # its health and cache followers connect
        moved = _run("127.0.0.1:54499", SAMPLED)
        assert relay.wait(timeout=30) != 0  # it died mid-stream
    finally:
        proxy.kill()
        relay.kill()
    assert moved.started is not None and moved.started.prefill_node == relay_address
    assert moved.token_ids == undisturbed.token_ids and moved.text == undisturbed.text
    assert moved.finished is not None and moved.finished.usage.completion_tokens == TOKENS
    (m,) = moved.finished.migrations
    assert m.tokens_sent == 1 and m.to_prefill_node == prefill[1].address
