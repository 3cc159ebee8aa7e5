"""deploy/kubernetes as CI sees it: every overlay (and the optional components) rendered with
`kubectl kustomize`, every object validated strictly (unknown fields fail) against the schemas of
Kubernetes 1.32 offline, and the deployment's invariants asserted on what is rendered."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from decode_svc.config import DecodeConfig
from decode_svc.metrics import DecodeMetrics
from kvmesh.cli import parse
from prefill_svc.config import PrefillConfig
from proxy.config import ProxyConfig

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "kubernetes"
VERSION = "1.32.0"
HEALTH = {"prefill": ("kvmesh.v1.Prefill", 50061), "decode": ("kvmesh.v1.Decode", 50071)}
HEALTH["proxy"] = ("kvmesh.v1.Generation", 50051)

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with kustomize) not installed")


def render(target: Path) -> list[dict[str, Any]]:
    out = subprocess.run(["kubectl", "kustomize", str(target)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module")
def with_components(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The cpu overlay with every optional component, as an operator would add them."""
    d = tmp_path_factory.mktemp("k")
    rel = os.path.relpath(DEPLOY, d)
    (d / "kustomization.yaml").write_text(
        f"resources: [{rel}/overlays/cpu]\ncomponents: [{rel}/components/api-keys, {rel}/components/servicemonitor]\n"
    )
    return d


def _targets(with_components: Path) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    yield "cpu", render(DEPLOY / "overlays" / "cpu")
    yield "gpu", render(DEPLOY / "overlays" / "gpu")
    yield "components", render(with_components)


def _kind(objs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == kind}


def _containers(objs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    for o in objs:
        if o["kind"] in ("Deployment", "StatefulSet"):
            for c in o["spec"]["template"]["spec"]["containers"]:
                yield o["metadata"]["name"], o, c


def test_every_object_validates_strictly(with_components: Path) -> None:
    for name, objs in _targets(with_components):
        for o in objs:
            if o["apiVersion"].startswith("monitoring.coreos.com/"):
                continue  # the Prometheus Operator's CRD: no schema of the Kubernetes API
            kubernetes_validate.validate(o, VERSION, strict=True)  # raises on any error
        assert {o["kind"] for o in objs} >= {"StatefulSet", "Deployment", "Service", "ConfigMap"}, name


def test_probes_storage_services_resources_and_tags(with_components: Path) -> None:
    for name, objs in _targets(with_components):
        for owner, o, c in _containers(objs):
            kind = owner.removeprefix("kvmesh-")
            service, port = HEALTH[kind]
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                grpc = c[probe]["grpc"]
                assert grpc["port"] == port, (name, owner, probe)
                assert grpc.get("service", service) == service
            assert c["readinessProbe"]["grpc"]["service"] == service
            assert any(p["containerPort"] == port for p in c["ports"])
            res = c["resources"]
            assert {"cpu", "memory"} <= set(res["requests"]) and {"cpu", "memory"} <= set(res["limits"]), owner
            image = c["image"]  # the tag scripts/compose_build.sh gives: the package's version
            assert image.rsplit(":", 1)[-1] == importlib.metadata.version("kvmesh"), image
            assert c["lifecycle"]["preStop"], owner
            # the grace period covers the preStop pause and the drain
            drain = float(_config(objs).get(f"KVMESH_{kind.upper()}_DRAIN_SECONDS", 30))
            pause = c["lifecycle"]["preStop"]["sleep"]["seconds"]
            assert o["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= drain + pause, owner
            anti = o["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
            assert anti["preferredDuringSchedulingIgnoredDuringExecution"], owner
            assert o["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
        (prefill,) = _kind(objs, "StatefulSet").values()
        (claim,) = prefill["spec"]["volumeClaimTemplates"]  # one PVC per prefill pod: its store
        mounts = prefill["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
        store = next(m for m in mounts if m["name"] == claim["metadata"]["name"])
        assert store["mountPath"] == _config(objs)["KVMESH_PREFILL_STORE"]
        assert prefill["spec"]["serviceName"] == "kvmesh-prefill"
        services = _kind(objs, "Service")
        open_ = {n for n, s in services.items() if s["spec"].get("clusterIP") != "None"}
        assert open_ == {"kvmesh-proxy"}, name  # only the proxy is reached through a virtual IP
        assert {p["port"] for p in services["kvmesh-proxy"]["spec"]["ports"]} >= {50051, 8000}
        assert set(_kind(objs, "PodDisruptionBudget")) == {"kvmesh-prefill", "kvmesh-decode", "kvmesh-proxy"}


def _config(objs: list[dict[str, Any]]) -> dict[str, str]:
    return dict(_kind(objs, "ConfigMap")["kvmesh-config"]["data"])


def test_settings_are_real_flags_and_the_autoscaler_a_real_metric(with_components: Path) -> None:
    fields = {
        "PREFILL": {f.name for f in dataclasses.fields(PrefillConfig)},
        "DECODE": {f.name for f in dataclasses.fields(DecodeConfig)},
        "PROXY": {f.name for f in dataclasses.fields(ProxyConfig)},
        "MODEL": {"activations"},  # `kvmesh model prepare` and `wait`: KVMESH_MODEL_ACTIVATIONS
    }
    for _, objs in _targets(with_components):
        envs = list(_config(objs))
        envs += [e["name"] for _, _, c in _containers(objs) for e in c.get("env", [])]
        for env in envs:
            _, service, field = env.split("_", 2)
            assert field.lower() in fields[service], env
        (hpa,) = _kind(objs, "HorizontalPodAutoscaler").values()
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "kvmesh-decode"}
        exported = {m.name for m in DecodeMetrics().registry.collect()}
        assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] in exported


def test_the_model_is_prepared_once_by_a_job_and_mounted_read_only_by_every_pod(
    with_components: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KVMESH_MODEL_ACTIVATIONS", "float16")  # the one model setting the ConfigMap may hold
    assert {parse(["model", c]).activations for c in ("prepare", "wait")} == {"float16"}
    version = importlib.metadata.version("kvmesh")
    for name, objs in _targets(with_components):
        (claim,) = (c for c in _kind(objs, "PersistentVolumeClaim").values())
        assert claim["metadata"]["name"] == "kvmesh-model" and claim["spec"]["accessModes"] == ["ReadWriteMany"]
        (job,) = _kind(objs, "Job").values()
        pod = job["spec"]["template"]["spec"]
        (prepare,) = pod["containers"]
        assert prepare["command"][:3] == ["kvmesh", "model", "prepare"], name
        assert prepare["volumeMounts"] == [{"name": "model", "mountPath": "/models"}]  # the one writer
        assert pod["volumes"] == [{"name": "model", "persistentVolumeClaim": {"claimName": "kvmesh-model"}}]
        readers = [prepare]
        for owner, o, c in _containers(objs):
            spec = o["spec"]["template"]["spec"]
            model = {"name": "model", "persistentVolumeClaim": {"claimName": "kvmesh-model", "readOnly": True}}
            assert model in spec["volumes"], owner
            (wait,) = spec["initContainers"]
            assert wait["command"][:3] == ["kvmesh", "model", "wait"], owner
            for mounting in (wait, c):
                assert {"name": "model", "mountPath": "/models", "readOnly": True} in mounting["volumeMounts"], owner
            readers += [wait, c]
        for c in readers:
            # the Job and the waits read the same settings (KVMESH_MODEL_ACTIVATIONS) and image
            assert {"configMapRef": {"name": "kvmesh-config"}} in c["envFrom"], c["name"]
            assert c["image"].rsplit(":", 1)[-1] == version
            res = c["resources"]
            assert {"cpu", "memory"} <= set(res["requests"]) and {"cpu", "memory"} <= set(res["limits"]), c["name"]
    gpu = render(DEPLOY / "overlays" / "gpu")
    assert _config(gpu)["KVMESH_MODEL_ACTIVATIONS"] == "float16"  # ORT's CUDA attention takes no float32
    assert "KVMESH_MODEL_ACTIVATIONS" not in _config(render(DEPLOY / "overlays" / "cpu"))


def test_the_gpu_overlay_puts_each_pool_on_its_kind_of_gpu_node() -> None:
    objs = render(DEPLOY / "overlays" / "gpu")
    wanted = {"kvmesh-prefill": "compute", "kvmesh-decode": "bandwidth"}
    for owner, o, c in _containers(objs):
        if owner not in wanted:
            assert "nvidia.com/gpu" not in c["resources"]["limits"]
            continue
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1 and "gpu" in c["image"]
        terms = o["spec"]["template"]["spec"]["affinity"]["nodeAffinity"]
        (term,) = terms["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
        assert term["matchExpressions"] == [
            {"key": "kvmesh.dev/gpu-class", "operator": "In", "values": [wanted[owner]]}
        ]
    assert _config(objs)["KVMESH_DECODE_PROVIDER"] == "cuda"


def test_what_podman_plays_is_the_overlay_pod_for_pod() -> None:
    """tests/kube_check.py (scripts/kube_e2e.sh) turns the rendered overlay into Pods: every replica
    a Pod named as Kubernetes names it, a PVC per prefill pod, the proxy's pools as those pods."""
    import sys

    sys.path.insert(0, str(ROOT / "tests"))
    from kube_check import podman_objects

    objs = render(DEPLOY / "overlays" / "cpu")
    played, configmaps = podman_objects(objs)
    pods = {o["metadata"]["name"]: o for o in played if o["kind"] == "Pod"}
    replicas = {
        o["metadata"]["name"]: o["spec"]["replicas"] for o in objs if o["kind"] in ("StatefulSet", "Deployment")
    }
    assert set(pods) == {"kvmesh-model", *(f"{name}-{i}" for name, n in replicas.items() for i in range(n))}
    assert pods["kvmesh-model"]["spec"]["restartPolicy"] == "OnFailure"  # the Job, run once
    claims = {o["metadata"]["name"] for o in played if o["kind"] == "PersistentVolumeClaim"}
    assert claims == {"kvmesh-model", *(f"store-kvmesh-prefill-{i}" for i in range(replicas["kvmesh-prefill"]))}
    command = pods["kvmesh-proxy-0"]["spec"]["containers"][0]["command"]
    assert [a for a in command if a.startswith("dns:")] == [
        *(f"dns:kvmesh-prefill-{i}:50061" for i in range(replicas["kvmesh-prefill"])),
        *(f"dns:kvmesh-decode-{i}:50071" for i in range(replicas["kvmesh-decode"])),
    ]
    assert [c["metadata"]["name"] for c in configmaps] == ["kvmesh-config"]
