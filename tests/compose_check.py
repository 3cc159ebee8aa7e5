"""Checks a running compose cluster from the host (run by scripts/compose_e2e.sh): an answer streamed
through the proxy, a second turn of the same session served from the prefix cache, and the next
request still answered after one prefill container is killed."""

import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kvmesh.client import Client
from kvmesh.errors import KvmeshError


def container_at(ip: str, project: str) -> str:
    """The project's container holding this IP address (the proxy names nodes by address)."""
    names = subprocess.run(
        ["podman", "ps", "--filter", f"label=io.podman.compose.project={project}", "--format", "{{.Names}}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    for name in names:
        fmt = "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}"
        ips = subprocess.run(["podman", "inspect", "-f", fmt, name], check=True, capture_output=True, text=True).stdout
        if ip in ips.split():
            return name
    raise SystemExit(f"no container of {project} has the address {ip}")


def wait_serving(client: Client, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.chat([{"role": "user", "content": "ping"}], max_tokens=1)
            return
        except KvmeshError as e:
            if time.monotonic() > deadline:
                raise SystemExit(f"the cluster did not answer within {timeout_s:.0f} s: {e}") from e
            time.sleep(1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--endpoint", default="127.0.0.1:50051")
    ap.add_argument("--project", default="kvmesh")
    ap.add_argument("--http", default="http://127.0.0.1:8000", help="the proxy's OpenAI HTTP API")
    args = ap.parse_args()
    client = Client(args.endpoint)
    wait_serving(client, 240)
    openai_api(args.http)
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
    container = container_at(victim, args.project)
    subprocess.run(["podman", "kill", container], check=True, capture_output=True)
    print(f"killed {container}")
    ask = [{"role": "user", "content": "Name a colour."}]
    third = client.chat(ask, session_id="compose-check", max_tokens=8, timeout=60)
    assert third.finished is not None and third.started.prefill_node.split(":")[0] != victim  # type: ignore[union-attr]
    print(f"after the kill: {third.text!r} via {third.started.prefill_node}")  # type: ignore[union-attr]
    scale(args.project, client)


def openai_api(base: str) -> None:
    """The published HTTP port answers as the OpenAI API does (the SDK as a user points it)."""
    import openai

    sdk = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=60)
    model = sdk.models.list().data[0].id
    reply = sdk.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=16,
        temperature=0,
    )
    print(f"OpenAI API ({model}): {reply.choices[0].message.content!r}")
    assert "Paris" in (reply.choices[0].message.content or "")


def scale(project: str, client: Client) -> None:
    """A second replica of decode-1 (what `docker compose up --scale decode-1=2` makes; podman-compose
    1.0.3 ignores --scale, so it is started by hand with the service's network alias): the proxy
    finds it through DNS and uses it."""
    env = ["-e", "KVMESH_DECODE_HOST=0.0.0.0", "-e", "KVMESH_DECODE_PORT=50071", "-e", "KVMESH_DECODE_THREADS=1"]
    # the cluster's token, as the compose file gives it, from this environment (`-e NAME` alone: never
    # on a command line)
    os.environ["KVMESH_DECODE_CLUSTER_TOKEN"] = os.environ.get("KVMESH_CLUSTER_TOKEN", "")
    env += ["-e", "KVMESH_DECODE_CLUSTER_TOKEN"]
    subprocess.run(
        [
            "podman",
            "run",
            "-d",
            "--init",
            "--name",
            f"{project}_decode-1_2",
            "--network",
            f"{project}_mesh",
            "--network-alias",
            "decode-1",
            "--label",
            f"io.podman.compose.project={project}",
            *env,
            "--volume",
            f"{project}_models:/models:ro",  # the model the `model` service prepared
            "localhost/kvmesh:latest",
            "kvmesh",
            "decode",
            "--node-id",
            "decode-1-2",
        ],
        check=True,
        capture_output=True,
    )
    deadline = time.monotonic() + 90
    while True:
        with ThreadPoolExecutor(6) as pool:
            replies = list(
                pool.map(
                    lambda i: client.chat([{"role": "user", "content": f"Count to {i}."}], max_tokens=24, timeout=60),
                    range(6),
                )
            )
        nodes = {r.started.decode_node for r in replies}  # type: ignore[union-attr]
        if len(nodes) >= 3:
            print(f"scaled: 6 concurrent requests used decode nodes {sorted(nodes)}")
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"after scaling, requests still used only {sorted(nodes)}")
        time.sleep(2)


if __name__ == "__main__":
    main()
