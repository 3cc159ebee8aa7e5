"""Checks a running compose cluster from the host (run by scripts/compose_e2e.sh): an answer streamed
through the proxy, a second turn of the same session served from the prefix cache, and the next
request still answered after one prefill container is killed."""

import argparse
import subprocess
import sys
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kvmesh.client import Client


def wait_serving(client: Client, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.chat([{"role": "user", "content": "ping"}], max_tokens=1)
            return
        except grpc.RpcError as e:
            if time.monotonic() > deadline:
                raise SystemExit(f"the cluster did not answer within {timeout_s:.0f} s: {e}") from e
            time.sleep(1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--endpoint", default="127.0.0.1:50051")
    ap.add_argument("--project", default="kvmesh")
    args = ap.parse_args()
    client = Client(args.endpoint)
    wait_serving(client, 240)
    turns = [{"role": "user", "content": "What is the capital of France?"}]
    first = client.chat(turns, session_id="compose-check", max_tokens=24, timeout=60)
    print(f"turn 1: {first.text!r} via {first.started.prefill_node}")  # type: ignore[union-attr]
    assert "Paris" in first.text, first.text
    time.sleep(1.0)  # the prefill node stores the blocks and tells the proxy
    turns += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And of Italy?"}]
    second = client.chat(turns, session_id="compose-check", max_tokens=24, timeout=60)
    cached = second.finished.usage.cached_tokens  # type: ignore[union-attr]
    print(f"turn 2: {second.text!r}, {cached} cached tokens")
    assert cached > 0
    victim = second.started.prefill_node.split(":")[0]  # type: ignore[union-attr]
    container = f"{args.project}_{victim}_1"
    subprocess.run(["podman", "kill", container], check=True, capture_output=True)
    print(f"killed {container}")
    ask = [{"role": "user", "content": "Name a colour."}]
    third = client.chat(ask, session_id="compose-check", max_tokens=8, timeout=60)
    assert third.finished is not None and third.started.prefill_node.split(":")[0] != victim  # type: ignore[union-attr]
    print(f"after the kill: {third.text!r} via {third.started.prefill_node}")  # type: ignore[union-attr]


if __name__ == "__main__":
    main()
