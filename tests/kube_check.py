"""deploy/kubernetes played with podman (scripts/kube_e2e.sh): the rendered cpu overlay turned into
what `podman kube play` runs, then checked from the host: an answer through the proxy pod, a second
turn with cached tokens, one prefill pod killed and the next request served.

podman 4.3 plays Pods, Deployments and PersistentVolumeClaims and has no Services or Jobs: so
each StatefulSet and Deployment replica becomes a Pod named as Kubernetes would name it (NAME-0,
...; a StatefulSet's pods with their PVC, store-NAME-i), the model Job one Pod (NAME), the
overlay's own PVC (the model's) a podman volume every pod mounts, the proxy's dns:SERVICE:PORT
pools one dns:POD:PORT per pod (podman's DNS answers pod names), probes and affinity are left to
podman (it ignores gRPC probes), and only the first proxy pod's gRPC and HTTP ports are published,
to 127.0.0.1 (+10000). The ConfigMap goes to `--configmap`.

  python tests/kube_check.py render RENDERED.yaml PLAY.yaml CONFIGMAP.yaml
  python tests/kube_check.py check --endpoint 127.0.0.1:60051
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kvmesh.client import Client
from kvmesh.errors import KvmeshError

PUBLISHED = 10000  # the first proxy pod's ports, on the host at port + this


def podman_objects(objs: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Rendered objects -> (what podman kube play plays, the ConfigMaps for --configmap)."""
    workloads = [o for o in objs if o["kind"] in ("StatefulSet", "Deployment")]
    pods_of = {
        o["metadata"]["name"]: [f"{o['metadata']['name']}-{i}" for i in range(o["spec"]["replicas"])] for o in workloads
    }
    # the claims first: the model's volume exists before any pod mounts it
    played: list[dict[str, Any]] = [o for o in objs if o["kind"] == "PersistentVolumeClaim"]
    for job in (o for o in objs if o["kind"] == "Job"):
        meta = job["spec"]["template"]["metadata"]
        played.append(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": job["metadata"]["name"], "labels": meta["labels"]},
                "spec": job["spec"]["template"]["spec"],
            }
        )
    for o in workloads:
        for i, pod in enumerate(pods_of[o["metadata"]["name"]]):
            spec = copy.deepcopy(o["spec"]["template"]["spec"])
            spec.pop("affinity", None)
            for c in spec["containers"]:
                c["command"] = _pools_as_pods(c["command"], pods_of)
                published = o["metadata"]["name"] == "kvmesh-proxy" and i == 0
                # podman publishes every containerPort on the host: only the first proxy's
                c["ports"] = [
                    {**p, "hostPort": p["containerPort"] + PUBLISHED, "hostIP": "127.0.0.1"}
                    for p in c.get("ports", [])
                    if published and p["name"] in ("grpc", "http")
                ]
            for t in o["spec"].get("volumeClaimTemplates", []):
                claim = f"{t['metadata']['name']}-{pod}"
                played.append(
                    {
                        "apiVersion": "v1",
                        "kind": "PersistentVolumeClaim",
                        "metadata": {"name": claim},
                        "spec": t["spec"],
                    }
                )
                spec.setdefault("volumes", []).append(
                    {"name": t["metadata"]["name"], "persistentVolumeClaim": {"claimName": claim}}
                )
            labels = o["spec"]["template"]["metadata"]["labels"]
            # podman 4.3 gives init containers the pod's restart policy: under Always (a
            # Deployment's) the finished model wait is started again and again, and podman then
            # fails to remove it ("cannot remove container ... as it is running": seen here). So
            # the played pods restart on failure only; no check here needs a restart on success.
            spec["restartPolicy"] = "OnFailure"
            meta = {"name": pod, "labels": labels}
            played.append({"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec})
    return played, [o for o in objs if o["kind"] == "ConfigMap"]


def _pools_as_pods(command: list[str], pods_of: dict[str, list[str]]) -> list[str]:
    """`--prefill dns:kvmesh-prefill:50061` -> `--prefill dns:kvmesh-prefill-0:50061 --prefill ...`."""
    out: list[str] = []
    for arg in command:
        if arg.startswith("dns:"):
            service, port = arg.removeprefix("dns:").split(":")
            flag = out.pop()
            for pod in pods_of[service]:
                out += [flag, f"dns:{pod}:{port}"]
        else:
            out.append(arg)
    return out


def pod_at(ip: str) -> str:
    """The pod holding this address (the proxy names nodes by address): a pod's network is its
    infra container's."""
    pods = subprocess.run(["podman", "pod", "ps", "--format", "{{.Name}}"], check=True, capture_output=True, text=True)
    for pod in pods.stdout.split():
        infra = subprocess.run(
            ["podman", "pod", "inspect", pod, "-f", "{{.InfraContainerID}}"], capture_output=True, text=True
        ).stdout.strip()
        fmt = "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}"
        ips = subprocess.run(["podman", "inspect", "-f", fmt, infra], capture_output=True, text=True).stdout
        if ip in ips.split():
            return pod
    raise SystemExit(f"no pod has the address {ip}")


def check(endpoint: str) -> None:
    client = Client(endpoint)
    deadline = time.monotonic() + 240
    while True:  # the pods start their services in parallel: the proxy is SERVING once a pool is
        try:
            client.chat([{"role": "user", "content": "ping"}], max_tokens=1, timeout=30)
            break
        except KvmeshError as e:
            if time.monotonic() > deadline:
                raise SystemExit(f"the pods did not answer within 240 s: {e}") from e
            time.sleep(1)
    turns = [{"role": "user", "content": "What is the capital of France?"}]
    first = client.chat(turns, session_id="kube-check", max_tokens=24, timeout=60)
    assert first.started is not None and "Paris" in first.text, first.text
    print(f"turn 1: {first.text!r} via {first.started.prefill_node}")
    time.sleep(1.0)  # the prefill pod stores the blocks and tells the proxy
    turns += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And of Italy?"}]
    second = client.chat(turns, session_id="kube-check", max_tokens=24, timeout=60)
    assert second.started is not None and second.finished is not None
    print(f"turn 2: {second.text!r}, {second.finished.usage.cached_tokens} cached tokens")
    assert second.finished.usage.cached_tokens > 0
    victim = second.started.prefill_node.split(":")[0]
    pod = pod_at(victim)
    subprocess.run(["podman", "pod", "kill", pod], check=True, capture_output=True)
    print(f"killed pod {pod}")
    third = client.chat(
        [{"role": "user", "content": "Name a colour."}], session_id="kube-check", max_tokens=8, timeout=60
    )
    assert third.started is not None and third.finished is not None
    assert third.started.prefill_node.split(":")[0] != victim
    print(f"after the kill: {third.text!r} via {third.started.prefill_node}")


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("render")
    r.add_argument("rendered", type=Path)
    r.add_argument("play", type=Path)
    r.add_argument("configmap", type=Path)
    c = sub.add_parser("check")
    c.add_argument("--endpoint", default=f"127.0.0.1:{50051 + PUBLISHED}")
    args = ap.parse_args()
    if args.command == "render":
        objs = [d for d in yaml.safe_load_all(args.rendered.read_text()) if d]
        played, configmaps = podman_objects(objs)
        if token := os.environ.get("KVMESH_E2E_TOKEN"):  # podman 4.3 ignores secretKeyRef: see kube_e2e.sh
            for service in ("PREFILL", "DECODE", "PROXY"):
                configmaps[0]["data"][f"KVMESH_{service}_CLUSTER_TOKEN"] = token
        args.play.write_text(yaml.safe_dump_all(played))
        args.configmap.write_text(yaml.safe_dump_all(configmaps))
    else:
        check(args.endpoint)


if __name__ == "__main__":
    main()
